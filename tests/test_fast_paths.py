"""Start-up paths stay light (issue 17): what `lymph-cv --help` and the drop-in tools import,
and the bulk mean that compute_image_mean uses (same bytes as Caffe's running sum)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lymph_cv.formats import store
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe import mean as mean_module
from lymph_cv.formats.caffe.blob import array_to_blob
from lymph_cv.formats.caffe.datum import array_to_datum, serialize_datum

HEAVY = ("torch", "cv2", "google.protobuf", "lymph_cv.stages", "scipy", "matplotlib")


def _modules_after(code: str, heavy: tuple = HEAVY) -> list[str]:
    """The ``heavy`` modules loaded by ``code`` in a fresh interpreter."""
    probe = (f"import sys\n{code}\n"
             f"print('MODULES=' + __import__('json').dumps([m for m in {heavy!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    line = next(line for line in done.stdout.splitlines() if line.startswith("MODULES="))
    return json.loads(line[len("MODULES="):])


def test_lymph_cv_help_imports_no_command():
    loaded = _modules_after("from lymph_cv.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert loaded == []


def test_summaries_match_the_commands():
    import click

    from lymph_cv.cli import COMMANDS, SUMMARIES, cli

    ctx = click.Context(cli)
    assert sorted(SUMMARIES) == sorted(COMMANDS), "every command needs its one-line summary in cli.SUMMARIES"
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        assert click.Command(name, help=SUMMARIES[name]).get_short_help_str(1000) == command.get_short_help_str(1000), name


def test_stain_option_constants_match_the_stages():
    from lymph_cv.commands import stain as stain_command
    from lymph_cv.stages import stain as stain_module
    from lymph_cv.stages.stain import apply as apply_module

    assert list(stain_command.STAIN_METHODS) == stain_module.method_names()
    assert stain_command.MONTAGE_IMAGES == apply_module.MONTAGE_IMAGES


def test_command_defaults_match_the_stages():
    import importlib

    from lymph_cv.commands import defaults

    names = [name for name in vars(defaults) if name.isupper() and name != "SOURCES"]
    assert sorted(names) == sorted(defaults.SOURCES), "every constant in commands/defaults.py names its source"
    for name, source in defaults.SOURCES.items():
        module, attribute = source.split(":")
        value = getattr(importlib.import_module(module), attribute)
        expected = getattr(defaults, name)
        if isinstance(expected, tuple) and not isinstance(value, tuple):  # a function's result, a mapping's keys
            value = tuple(value() if callable(value) else value)
        assert expected == value, f"commands/defaults.py {name} = {expected!r}, but {source} is {value!r}: update it"


#: Command modules that load no numpy, OpenCV or stage module to be defined (their ``--help`` is at
#: the interpreter's start-up floor).
LIGHT_COMMAND_MODULES = ("lymph_cv.commands.stain", "lymph_cv.commands.train", "lymph_cv.commands.heldout",
                         "lymph_cv.commands.pycaffe_path", "lymph_cv.commands.data", "lymph_cv.commands.evaluate",
                         "lymph_cv.commands.inspect", "lymph_cv.commands.import_data", "lymph_cv.commands.bags",
                         "lymph_cv.commands.jobs", "lymph_cv.commands.render", "lymph_cv.commands.slides")


@pytest.mark.parametrize("module", LIGHT_COMMAND_MODULES)
def test_light_commands_load_no_numpy_or_stage(module):
    assert _modules_after(f"import {module}", HEAVY + ("numpy",)) == []


@pytest.mark.parametrize("module", ["lymph_cv.commands.run", "lymph_cv.commands.plot_log"])
def test_commands_on_light_stage_modules_load_no_numpy(module):
    # run loads the pipeline engine (stage names, the executors' registry), not the stages' modules
    assert _modules_after(f"import {module}", ("numpy", "cv2", "torch", "scipy", "matplotlib", "jinja2",
                                                 "google.protobuf")) == []


def test_report_headline_loads_no_numpy(tmp_path):
    (tmp_path / "eval" / "fold_1").mkdir(parents=True)
    record = {"fold": 1, "classes": ["A", "B"], "confusion": [[2, 0], [1, 1]], "accuracy": 0.75, "balanced_accuracy": 0.75}
    (tmp_path / "eval" / "fold_1" / "metrics.json").write_text(json.dumps(record))
    code = ("from lymph_cv.stages.report_folds import headline\n"
            f"line = headline({str(tmp_path)!r})\n"
            "assert line == '4 images over folds 1: pooled accuracy 0.750, balanced accuracy 0.750', line")
    assert _modules_after(code, ("numpy", "cv2", "torch", "matplotlib", "jinja2", "google.protobuf")) == []


def test_compute_image_mean_loads_neither_opencv_torch_nor_protobuf(tmp_path):
    with store.open_writer(tmp_path / "db", "leveldb") as writer:
        for i in range(3):
            writer.put(store.make_key(i, f"p{i}"), serialize_datum(np.full((3, 2, 2), i, np.uint8), 0))
    code = ("from lymph_cv.commands.compute_image_mean import main\n"
            f"assert main(['-backend', 'leveldb', {str(tmp_path / 'db')!r}, {str(tmp_path / 'm.binaryproto')!r}]) == 0")
    assert _modules_after(code) == []
    assert (tmp_path / "m.binaryproto").is_file()
    # The native path's start-up is Python's and plyvel's plus our modules: typing and pathlib
    # (and the regexes pathlib's imports compile) would be ~10 ms of fold 1's ~0.1 s (issue 17).
    assert _modules_after(code, ("typing", "pathlib", "urllib.parse", "numpy")) == []


def _naive_mean(records: list[np.ndarray]) -> np.ndarray:
    total = np.zeros(records[0].size, np.float32)
    for pixels in records:
        total += pixels.reshape(-1)  # compute_image_mean: one float32 rounding per record and pixel
    return (total / np.float32(len(records))).reshape(records[0].shape)


@pytest.mark.parametrize("backend", store.BACKENDS)
def test_bulk_mean_equals_caffe_running_sum(tmp_path, backend):
    rng = np.random.default_rng(7)
    count = 2 * mean_module.READ_BATCH + 300
    records = list(rng.integers(0, 256, (count, 3, 2, 3), dtype=np.uint8))
    labels = rng.integers(0, 3, count)
    labels[mean_module.READ_BATCH + 5] = 300  # a 2-byte label: that batch is not of one length
    with store.open_writer(tmp_path / "db", backend) as writer:
        for i, (pixels, label) in enumerate(zip(records, labels)):
            writer.put(store.make_key(i, f"p{i}"), serialize_datum(pixels, int(label)))
    seen = []
    mean, n = mean_module.mean_of_db(tmp_path / "db", backend, progress=seen.append, progress_every=1000)
    assert n == count and seen == list(range(1000, count + 1, 1000))
    assert mean.dtype == np.float32 and np.array_equal(mean, _naive_mean(records))


def test_accumulator_rounds_like_caffe_past_2_24():
    rng = np.random.default_rng(0)
    rows = rng.integers(230, 256, (80000, 4), dtype=np.uint8)  # sums pass 2^24 after ~69k rows
    accumulator = mean_module.MeanAccumulator()
    accumulator.add_batch(rows[:, :][::1], (1, 2, 2))
    expected = np.zeros(4, np.float32)
    for row in rows:
        expected += row
    assert expected.max() > 2**24 and np.array_equal(accumulator.sum, expected)
    assert not np.array_equal(expected, rows.sum(0, dtype=np.int64).astype(np.float32))


def test_bulk_mean_of_float_and_raw_records(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, (4, 3, 2, 2), dtype=np.uint8)
    with store.open_writer(tmp_path / "db", "lmdb") as writer:
        writer.put(store.make_key(0, "a"), array_to_datum(images[0].astype(np.float32), 0).SerializeToString())
        for i in range(1, 4):
            writer.put(store.make_key(i, "b"), serialize_datum(images[i], 1))
    mean, count = mean_module.mean_of_db(tmp_path / "db")
    assert count == 4 and np.array_equal(mean, _naive_mean(list(images)))


@pytest.mark.parametrize("shape", [(3, 36, 36), (1, 5, 7), (1, 3, 1, 2)])
def test_mean_bytes_equal_protobuf(shape):
    array = np.random.default_rng(1).random(shape).astype(np.float32) * 255
    chw = array[0] if len(shape) == 4 else array
    assert mean_module.mean_to_bytes(array) == array_to_blob(chw, legacy=True).SerializeToString()
    parsed = caffe_pb2.BlobProto.FromString(mean_module.mean_to_bytes(array))
    assert (parsed.num, parsed.channels, parsed.height, parsed.width) == (1,) + chw.shape


def test_raw_layout_refuses_other_records():
    raw = serialize_datum(np.zeros((3, 4, 5), np.uint8), 2)
    assert mean_module.raw_layout(raw) == (raw[: raw.index(bytes(60))], (3, 4, 5))
    assert mean_module.raw_layout(array_to_datum(np.zeros((1, 2, 2), np.float32), 0).SerializeToString()) is None
    assert mean_module.raw_layout(raw[:20]) is None and mean_module.raw_layout(b"") is None


def test_convert_with_decoding_workers_writes_the_same_database(tmp_path):
    from datautil import list_workdir
    from lymph_cv.stages import dbs

    work = list_workdir(tmp_path / "work", width=100, height=80)
    lines = (work / "train_w32_1.txt").read_text().splitlines()
    lines.insert(3, "subs/missing_sub_1.tif 1")  # skipped, its index still consumed
    (work / "list.txt").write_text("\n".join(lines) + "\n")
    results = {}
    for workers in (1, 2):
        result = dbs.convert_list(work, work / "list.txt", tmp_path / f"db{workers}", backend="leveldb", seed=3,
                                  mean_path=tmp_path / f"mean{workers}", skip_bad=True, workers=workers,
                                  options=dbs.ImageOptions(check_size=True))
        with store.open_reader(tmp_path / f"db{workers}") as reader:
            results[workers] = (list(reader), (tmp_path / f"mean{workers}").read_bytes(), result.problems)
    assert results[1] == results[2]
    assert len(results[1][0]) == len(lines) - 1 and len(results[1][2]) == 1


@pytest.mark.parametrize("backend", store.BACKENDS)
def test_streamed_records_gather_what_memory_holds(tmp_path, backend):
    from trainutil import write_db

    from lymph_cv.net import stream
    from lymph_cv.net.datalayer import load_records

    rng = np.random.default_rng(5)
    count = 3 * stream.CHUNK_RECORDS + 77
    images = rng.integers(0, 256, (count, 3, 4, 4), dtype=np.uint8)
    labels = rng.integers(0, 3, count)
    labels[stream.CHUNK_RECORDS + 1] = 200  # a two-byte label: that chunk is parsed record by record
    write_db(tmp_path / "db", images, labels, backend)
    memory = load_records(tmp_path / "db")
    streamed = stream.StreamedRecords(tmp_path / "db")
    try:
        assert len(streamed) == count and streamed.shape == (3, 4, 4)
        batch = 1000
        starts = [b * batch % count for b in range(12)] + [5000, 10, count - 3, 4000]  # wraps, jumps back
        for start in starts:
            rows = (start + np.arange(batch)) % count
            got, want = streamed.gather(rows), memory.gather(rows)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    finally:
        streamed.close()


def test_training_streamed_equals_training_in_memory(tmp_path):
    import torch
    from trainutil import make_dataset, make_fold

    from lymph_cv.net.stream import StreamedRecords
    from lymph_cv.stages.train import Trainer

    make_dataset(tmp_path)
    solver = make_fold(tmp_path, max_iter=6, test_interval=3, test_iter=2, snapshot=0, display=0)
    runs = []
    for max_memory in (None, 1000):  # 1000 bytes: both databases are streamed
        trainer = Trainer(solver, device="cpu", max_memory=max_memory, seed=3)
        streamed = isinstance(trainer.train_data[0].records, StreamedRecords)
        assert streamed == (max_memory is not None)
        trainer.solve(progress=False, log_file=False)
        trainer.record_cache.close()
        runs.append(({k: v.detach().clone() for k, v in trainer.net.state_dict().items()}, trainer.result.test_scores))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])


def test_max_memory_sizes():
    from lymph_cv.net.stream import parse_memory

    assert parse_memory("512M") == 512 << 20 and parse_memory("2GiB") == 2 << 30 and parse_memory("1000") == 1000
    with pytest.raises(ValueError, match="expected a size"):
        parse_memory("lots")


def test_serialize_datums_in_bulk_equal_one_by_one():
    from lymph_cv.formats.caffe.datum import serialize_datums

    rows = np.random.default_rng(2).integers(0, 256, (5, 3 * 4 * 2), dtype=np.uint8)
    for labels in ([0, 1, 2, 127, 5], [0, 128, -1, 3, 2**31 - 1]):  # one-byte labels, then any
        expected = [serialize_datum(row.reshape(3, 4, 2), label) for row, label in zip(rows, labels)]
        assert serialize_datums(rows, (3, 4, 2), np.array(labels)) == expected


def test_released_shared_patch_rows_keep_their_data(tmp_path):
    import mmap

    from lymph_cv.stages.dbs import cache as patch_cache

    rows, shape = 3000, (3, 4, 4)
    token = "test-release"
    patch_cache._SHARED[token] = mmap.mmap(-1, rows * 48)
    cache = patch_cache.PatchCache(token, True, rows, shape, {"a": 0}, {"a": rows})
    try:
        data = np.random.default_rng(0).integers(0, 256, (rows, 48), dtype=np.uint8)
        cache.open(writable=True)[:] = data
        cache.release(10, 2000)
        cache.release()
        assert np.array_equal(cache.open(), data)
    finally:
        cache.remove()


def test_freed_memory_is_kept_on_glibc():
    import platform

    from lymph_cv.core.threads import keep_freed_memory

    assert keep_freed_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


#: What no ``--help`` may load (issue 17: every command's help at the interpreter's start-up floor).
HELP_HEAVY = ("torch", "numpy", "cv2", "lymph_cv.stages", "lymph_cv.pipeline", "lymph_cv.cluster.schedulers",
              "lymph_cv.core.locks", "google.protobuf", "scipy", "matplotlib", "jinja2", "openslide", "plyvel", "lmdb")


def test_every_help_loads_no_torch_numpy_opencv_or_stage():
    # One interpreter shows each help in turn (a group's subcommands' too) and names the first that
    # loaded a heavy module.
    probe = textwrap.dedent(f"""
        import json, sys
        import click
        from lymph_cv.cli import COMMANDS, cli, main
        found = {{}}
        def show(args):
            try:
                main(args)
            except SystemExit:
                pass
            new = [m for m in {HELP_HEAVY!r} if m in sys.modules and not any(m in v for v in found.values())]
            if new:
                found[' '.join(args)] = new
        show(['--help'])
        for name in sorted(COMMANDS):
            show([name, '--help'])
            for sub in sorted(getattr(cli.get_command(click.Context(cli), name), 'commands', {{}})):
                show([name, sub, '--help'])
        print('LOADED=' + json.dumps(found))
        """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    line = next(line for line in done.stdout.splitlines() if line.startswith("LOADED="))
    assert json.loads(line[len("LOADED="):]) == {}


def test_exact_integer_sum_hands_over_to_float32_mid_way():
    # uint8 records are summed as integers while no sum can pass 2^24; a float record or the
    # EXACT_RECORDS-th record hands the sum to Caffe's float32 running sum with the same bytes.
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 256, (300, 3, 2, 2), dtype=np.uint8)
    floats = rng.random((3, 2, 2)).astype(np.float32) * 255
    accumulator = mean_module.MeanAccumulator()
    accumulator.add_batch(rows[:200].reshape(200, -1), (3, 2, 2))
    accumulator.add_float(floats)
    accumulator.add_batch(rows[200:].reshape(100, -1), (3, 2, 2))
    assert np.array_equal(accumulator.mean(), _naive_mean([*rows[:200], floats, *rows[200:]]))
    bright = np.full((mean_module.EXACT_RECORDS + 5, 4), 255, np.uint8)
    accumulator = mean_module.MeanAccumulator()
    accumulator.add_batch(bright, (1, 2, 2))
    expected = np.full(4, 255 * mean_module.EXACT_RECORDS, np.float32)
    for _ in range(5):
        expected += np.float32(255)
    assert np.array_equal(accumulator.sum, expected)


def test_run_shows_its_plan_first_on_a_terminal(tmp_path):
    # Loading the stages takes seconds (torch): on a terminal `run` says what it will do before that.
    import os
    import pty
    import select
    import time

    (tmp_path / "data").mkdir()
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "lymph_cv", "run", str(tmp_path / "w"), "--data",
                                str(tmp_path / "data"), "--folds", "1,3"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    seen, deadline = b"", time.monotonic() + 60
    try:
        while b"\n" not in seen and time.monotonic() < deadline:
            if select.select([leader], [], [], 1)[0]:
                chunk = os.read(leader, 4096)
                if not chunk:
                    break
                seen += chunk
    finally:
        process.kill()  # it would load the stages and stop on the empty data folder
        process.wait(timeout=60)
        os.close(leader)
    assert seen.splitlines()[0].decode() == (f"== run {tmp_path / 'w'}: data {tmp_path / 'data'}, "
                                             "alexnet32w on cpu, folds 1,3 of 5, training local")
