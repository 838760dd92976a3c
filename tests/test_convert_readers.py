"""convert_imageset's fast path: plain TIFFs read without a decoder (the pixels OpenCV gives), forked
readers over pipes (same records as reading in the writer), their errors and interrupts."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from lymph_cv.core import forkpipe, rawtiff
from lymph_cv.core.faults import FAULT_ENV
from lymph_cv.errors import InputError, LymphCVError
from lymph_cv.formats import convread, store
from lymph_cv.stages import dbs
from lymph_cv.stages.dbs import lists
from lymph_cv.stages.dbs.convert import RECORDS_EVENT
from lymph_cv.stages.synth import TIFF_UNCOMPRESSED

REPO_ROOT = Path(__file__).resolve().parents[1]


def _rgb(seed: int, height: int = 9, width: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _opencv_tiff(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".tif", rgb[..., ::-1], TIFF_UNCOMPRESSED)
    assert ok
    return data.tobytes()


def _tifffile(path: Path, array: np.ndarray, **options) -> bytes:
    tifffile.imwrite(path, array, **options)
    return path.read_bytes()


def _opencv_chw(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).transpose(2, 0, 1)


PLAIN_KINDS = {
    "opencv": lambda path, rgb: _opencv_tiff(rgb),
    "one strip": lambda path, rgb: _tifffile(path, rgb, photometric="rgb"),
    "strips of 2 rows": lambda path, rgb: _tifffile(path, rgb, photometric="rgb", rowsperstrip=2),
    "big-endian": lambda path, rgb: _tifffile(path, rgb, photometric="rgb", byteorder=">"),
    "with resolution": lambda path, rgb: _tifffile(path, rgb, photometric="rgb", resolution=(72, 72)),
}
OTHER_KINDS = {
    "deflate": lambda path, rgb: _tifffile(path, rgb, photometric="rgb", compression="zlib"),
    "tiled": lambda path, rgb: _tifffile(path, np.pad(rgb, ((0, 7), (0, 9), (0, 0))), photometric="rgb",
                                         tile=(16, 16)),
    "planar": lambda path, rgb: _tifffile(path, rgb.transpose(2, 0, 1), photometric="rgb", planarconfig="separate"),
    "16-bit": lambda path, rgb: _tifffile(path, rgb.astype(np.uint16) * 257, photometric="rgb"),
    "gray": lambda path, rgb: _tifffile(path, rgb[..., 0], photometric="minisblack"),
    "rgba": lambda path, rgb: _tifffile(path, np.dstack([rgb, rgb[..., :1]]), photometric="rgb", extrasamples=[2]),
    "png": lambda path, rgb: cv2.imencode(".png", rgb[..., ::-1])[1].tobytes(),
}


@pytest.mark.parametrize("kind", sorted(PLAIN_KINDS))
def test_plain_tiffs_give_opencvs_pixels_without_decoding(tmp_path, kind):
    files = [PLAIN_KINDS[kind](tmp_path / f"{i}.tif", _rgb(i)) for i in range(3)]
    layout = rawtiff.plain_layout(files[0])
    assert layout is not None and (layout.height, layout.width) == (9, 7)
    table = rawtiff.stack(files, layout.size)
    assert rawtiff.match(layout, table).all()
    assert np.array_equal(rawtiff.bgr_chw(layout, table), np.stack([_opencv_chw(data) for data in files]))


@pytest.mark.parametrize("kind", sorted(OTHER_KINDS))
def test_other_images_are_left_to_opencv(tmp_path, kind):
    assert rawtiff.plain_layout(OTHER_KINDS[kind](tmp_path / "x.tif", _rgb(1))) is None


def test_a_file_differing_outside_its_pixels_does_not_match():
    data = _opencv_tiff(_rgb(0))
    layout = rawtiff.plain_layout(data)
    changed = bytearray(data)
    changed[-3] ^= 1  # a byte of the directory
    table = rawtiff.stack([data, bytes(changed)], layout.size)
    assert rawtiff.match(layout, table).tolist() == [True, False]
    assert rawtiff.plain_layout(data[:-20]) is None and rawtiff.plain_layout(b"II*\x00") is None


@pytest.mark.parametrize("seed", [0, 1, 4, 2**32 - 1, 2**32, 2**64 - 1])
def test_native_order_is_numpys_permutation(seed):
    for count in (0, 1, 2, 3, 255, 1000):
        expected = np.random.default_rng(seed).permutation(count).tolist()
        assert np.frombuffer(convread.permutation(count, seed), np.int64).tolist() == expected
        assert lists.record_order(count, seed).tolist() == expected
    with pytest.raises(OverflowError):
        convread.permutation(3, 2**64)
    assert lists.record_order(7, 2**70).tolist() == np.random.default_rng(2**70).permutation(7).tolist()  # numpy's
    assert lists.record_order(5, None).tolist() == [0, 1, 2, 3, 4]


LISTS = {
    "plain": "a/p0.tif 0\nb/p 1.tif\t 12\n\n  c/q.tif   0007  \n\t\nd.tif 2147483647",
    "crlf": "a.tif 1\r\nb.tif 0\r\n",
    "non-ascii": "a/\u00e9.tif 1\nb.tif 0\n",
    "unicode space": "a.tif\u20281\n",
    "parent": "a/../b.tif 1\n",
    "dots in a name": "a/b..c.tif 1\n",
    "absolute": "/a.tif 1\n",
    "drive": "C:a.tif 1\n",
    "one field": "a.tif 1\nb.tif\n",
    "signed": "a.tif +1\n",
    "negative": "a.tif -1\n",
    "past int32": "a.tif 2147483648\n",
    "long label": "a.tif 0000000000001\n",
    "empty": "\n\n",
}


@pytest.mark.parametrize("kind", sorted(LISTS))
def test_native_list_scan_reads_what_read_image_list_reads(tmp_path, kind, monkeypatch):
    path = tmp_path / "list.txt"
    path.write_bytes(LISTS[kind].encode("utf-8"))
    try:
        expected = dbs.read_image_list(path)
    except InputError as exc:
        with pytest.raises(InputError, match=str(exc).replace("(", r"\(").replace(")", r"\)")):
            lists.scan_image_list(path)
    else:
        scanned = lists.scan_image_list(path)
        assert list(scanned) == expected and len(scanned) == len(expected)
        assert isinstance(scanned, lists.ScannedList) == (kind == "plain")  # the rest: read_image_list
        assert scanned[-1] == expected[-1]
    assert (convread.scan_list(LISTS[kind].encode("utf-8")) is None) == (kind != "plain")


def test_native_plain_reader_writes_the_numpy_readers_records(tmp_path, monkeypatch):
    """Whole chunks of plain TIFFs read natively; a chunk with a file of other bytes outside its
    pixels, a missing file or a label past one varint byte is read the numpy way: same records."""
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    names = [f"{'ab'[i % 2]}/p{i}.tif" for i in range(600)]
    for i, name in enumerate(names):
        (root / name).write_bytes(_opencv_tiff(_rgb(i)))
    (root / "a" / "odd.tif").write_bytes(_opencv_tiff(_rgb(9, 11, 7)))  # another layout
    lines = [f"{name} {i % 3}" for i, name in enumerate(names)]
    lines[300:300] = ["a/odd.tif 1", "a/missing.tif 0"]
    lines.append("b/p1.tif 200")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    got = {}
    for native in ("scanned", "1", "0"):  # scanned: the list as convert_imageset reads it
        monkeypatch.setenv(lists.NATIVE_ENV, "0" if native == "0" else "1")
        entries = lists.scan_image_list(tmp_path / "list.txt") if native == "scanned" else None
        assert isinstance(entries, lists.ScannedList) or native != "scanned"
        for workers in (0, 2):
            db = tmp_path / f"db{native}{workers}"
            result = dbs.convert_list(f"{root}/", tmp_path / "list.txt", db, backend="lmdb", seed=5, skip_bad=True,
                                      workers=workers, concat_root=True, entries=entries)
            got[native, workers] = (_records(db), result.problems)
    assert len(set(map(repr, got.values()))) == 1
    records, problems = got["1", 0]
    assert len(records) == len(lines) - 1 and len(problems) == 1 and "missing.tif" in problems[0]
    entries = dbs.read_image_list(tmp_path / "list.txt")
    expected = {}
    for index, position in enumerate(dbs.shuffled_order(len(entries), 5)):
        entry = entries[position]
        if entry.name != "a/missing.tif":
            expected[store.make_key(index, entry.name)] = dbs.record_value(root / entry.name, entry.label)[0]
    assert dict(records) == expected
    # Bytes outside the pixels that differ from the layout's: not read natively.
    layout = rawtiff.plain_layout((root / "a/p0.tif").read_bytes())
    changed = bytearray((root / "a/p0.tif").read_bytes())
    changed[-3] ^= 1
    (root / "a/p0.tif").write_bytes(bytes(changed))
    read = [f"{root}/", ["b/p1.tif", "a/p2.tif"], [0, 127], 41, layout.head, layout.tail, 9, 7]
    for vector in (False, True):  # the scalar deinterleave and SSSE3's (9 x 7 pixels: 3 vectors and a tail)
        convread.set_ssse3(vector)
        keys, key_lengths, values, length = convread.plain_datums(*read)
        assert (keys, key_lengths) == (b"00000041_b/p1.tif00000042_a/p2.tif", [17, 17])
        assert [values[:length], values[length:]] == [dbs.record_value(root / "b/p1.tif", 0)[0],
                                                      dbs.record_value(root / "a/p2.tif", 127)[0]]
    assert convread.set_ssse3(True) == (platform.machine() in ("x86_64", "AMD64"))
    assert convread.plain_datums(read[0], ["b/p1.tif", "a/p0.tif"], *read[2:]) is None
    assert convread.plain_datums(read[0], read[1], [0, 128], *read[3:]) is None
    # Files in more folders than stay open (16), in turn: folders closed and opened again.
    names = []
    for i in range(20):
        (root / f"f{i}").mkdir()
        (root / f"f{i}" / "p.tif").write_bytes(_opencv_tiff(_rgb(i)))
        names.append(f"f{i}/p.tif")
    names = names + names[::-1] + names
    keys, key_lengths, values, length = convread.plain_datums(f"{root}/", names, [1] * len(names), 0, *read[4:])
    assert [values[i * length : (i + 1) * length] for i in range(len(names))] == \
        [dbs.record_value(root / name, 1)[0] for name in names]
    convread.close_folders()


def test_convert_imageset_on_plain_tiffs_loads_no_numpy(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for i in range(3):
        (root / f"p{i}.tif").write_bytes(_opencv_tiff(_rgb(i)))
    (tmp_path / "list.txt").write_text("".join(f"p{i % 3}.tif {i % 2}\n" for i in range(600)))
    code = ("import sys\nfrom lymph_cv.commands.convert_imageset import main\n"
            f"status = main(['-shuffle', '-backend', 'leveldb', {str(root) + '/'!r}, {str(tmp_path / 'list.txt')!r}, "
            f"{str(tmp_path / 'db')!r}])\n"
            "print('NUMPY=' + str('numpy' in sys.modules))\nsys.exit(status)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert "NUMPY=False" in done.stdout
    assert len(_records(tmp_path / "db")) == 600


@pytest.fixture()
def mixed(tmp_path):
    """Patch files of two plain layouts, images OpenCV decodes (converted ones too), bad files; a list."""
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    lines = []
    for i in range(40):
        kind = ("opencv", "opencv", "strips of 2 rows", "png", "gray", "16-bit", "deflate")[i % 7]
        maker = PLAIN_KINDS.get(kind) or OTHER_KINDS[kind]
        name = f"{'ab'[i % 2]}/p{i}.tif"
        (root / name).write_bytes(maker(root / name, _rgb(i, 9 if i % 5 else 11, 7)))
        lines.append(f"{name} {i % 3}")
    (root / "a" / "short.tif").write_bytes(_opencv_tiff(_rgb(99))[:-10])  # its directory cut off
    (root / "a" / "empty.tif").write_bytes(b"")
    lines[5:5] = ["a/short.tif 1", "a/missing.tif 0", "a/empty.tif 2", "a 1"]
    lines.append("b/p1.tif 200")  # a label of two varint bytes
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return root, tmp_path / "list.txt"


def _records(path):
    with store.open_reader(path) as reader:
        return list(reader)


def test_forked_readers_write_what_the_writer_reads_itself(mixed, tmp_path):
    root, listing = mixed
    got = {}
    for workers in (0, 1, 3):
        result = dbs.convert_list(root, listing, tmp_path / f"db{workers}", backend="leveldb", seed=4, skip_bad=True,
                                  workers=workers)
        got[workers] = (_records(tmp_path / f"db{workers}"), result.problems, result.conversions)
    assert got[0] == got[1] == got[3]
    records, problems, conversions = got[0]
    assert len(problems) == 4 and len(records) == 41 and set(conversions) == {"grayscale", "16-bit 3-channel"}
    # Each record is OpenCV's reading of its line (record_value), under Caffe's key.
    entries = dbs.read_image_list(listing)
    order = dbs.shuffled_order(len(entries), 4)
    expected = {}
    for index, position in enumerate(order):
        entry = entries[position]
        try:
            expected[store.make_key(index, entry.name)] = dbs.record_value(root / entry.name, entry.label)[0]
        except InputError:
            continue
    assert dict(records) == expected


def test_forked_readers_stop_at_the_first_bad_line_like_one_process(mixed, tmp_path):
    root, listing = mixed
    messages = []
    for workers in (0, 2):
        with pytest.raises(InputError) as caught:
            dbs.convert_list(root, listing, tmp_path / f"db{workers}", backend="lmdb", workers=workers)
        messages.append(str(caught.value))
        assert not (tmp_path / f"db{workers}").exists()
    assert messages[0] == messages[1] and "short.tif" in messages[0] and "line 6" in messages[0]


def _square(job):
    return job * job, [bytes([job]) * job, np.full(2, job, np.uint8)]


def _bad_at_five(job):
    if job == 5:
        raise InputError("job five is bad", "somewhere")
    return _square(job)


def _dies_at_two(job):
    if job == 2:
        os._exit(3)
    return _square(job)


def _children() -> set[int]:
    """This process's child processes (Linux)."""
    found = set()
    for task in Path("/proc/self/task").iterdir():
        found.update(int(pid) for pid in (task / "children").read_text().split())
    return found


def test_ordered_results_in_order_and_their_errors():
    before = _children()
    with forkpipe.OrderedResults(_square, 5, 2) as results:
        assert [(header, bytes(block)) for header, block in results] == \
            [(j * j, bytes([j]) * j + bytes([j, j])) for j in range(5)]
    assert _children() == before
    with forkpipe.OrderedResults(_bad_at_five, 7, 3) as results, \
            pytest.raises(InputError, match="somewhere: job five"):
        list(results)
    with forkpipe.OrderedResults(_dies_at_two, 9, 1, "squares") as results, \
            pytest.raises(LymphCVError, match="squares: a process died"):
        list(results)
    with forkpipe.OrderedResults(_square, 40, 2) as results:  # abandoned early: the children are killed
        next(iter(results))
    assert _children() == before


def test_ordered_results_in_shared_slots():
    before = _children()
    # The results that fit (jobs 0-4: up to 6 bytes) come as views of a slot, the rest by the pipe.
    with forkpipe.OrderedResults(_square, 30, 2, shared_bytes=6) as results:
        got = [(header, type(block), bytes(block)) for header, block in results]
    assert [(header, data) for header, _kind, data in got] == \
        [(j * j, bytes([j]) * j + bytes([j, j])) for j in range(30)]
    assert [kind for _header, kind, _data in got] == [memoryview] * 5 + [bytes] * 25
    # Every result in a slot: each child fills its slots again and again (forkpipe.SLOTS each).
    count = 4 * forkpipe.SLOTS + 3
    with forkpipe.OrderedResults(_square, count, 2, shared_bytes=64) as results:
        got = [(header, type(block), bytes(block)) for header, block in results]
    assert got == [(j * j, memoryview, bytes([j]) * j + bytes([j, j])) for j in range(count)]
    with forkpipe.OrderedResults(_bad_at_five, 7, 2, shared_bytes=64) as results, \
            pytest.raises(InputError, match="somewhere: job five"):
        list(results)
    with forkpipe.OrderedResults(_square, 40, 2, shared_bytes=64) as results:  # abandoned while views are held
        held = next(iter(results))
    assert bytes(held[1]) == bytes([0, 0]) and _children() == before


@pytest.mark.parametrize("kind, status", [("int", 130), ("term", 143)])
def test_interrupted_convert_imageset_leaves_no_database(tmp_path, kind, status):
    root = tmp_path / "root"
    root.mkdir()
    for i in range(3):
        (root / f"p{i}.tif").write_bytes(_opencv_tiff(_rgb(i)))
    (tmp_path / "list.txt").write_text("".join(f"p{i % 3}.tif {i % 2}\n" for i in range(2600)))
    env = {**os.environ, FAULT_ENV: f"{kind}@{RECORDS_EVENT}#2", "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, str(REPO_ROOT / "tools" / "convert_imageset"), "-workers", "2", "-backend", "leveldb",
            f"{root}/", str(tmp_path / "list.txt"), str(tmp_path / "db")]
    stopped = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == status, stopped.stderr
    assert "Processed 2000 files." in stopped.stderr and "Traceback" not in stopped.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.txt", "root"]
    del env[FAULT_ENV]
    assert subprocess.run(argv, env=env, capture_output=True, timeout=120).returncode == 0
    assert len(_records(tmp_path / "db")) == 2600
