"""``lymph-cv inspect``: recognition by contents, text and JSON output, one-line errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lymph_cv.formats.caffe.datum import serialize_datum
from lymph_cv.formats.inspect import describe
from lymph_cv.errors import FormatError
from lymph_cv.formats.store import BACKENDS, make_key, open_writer
from lymph_cv.net.archs import arch_names
from lymph_cv.stages.render import render_deploy_text
from netutil import rendered

FOLD1_CHANNEL_MEANS = (119.34, 97.27, 118.56)  # B, G, R
MODEL = "1_caffenet_train_w32_iter_600000.caffemodel"
MEAN = "DB_train_w32_1.binaryproto"


def _ok(runner, cli, *args):
    result = runner.invoke(cli, ["inspect", *map(str, args)])
    assert result.exit_code == 0, result.stderr
    return result.stdout


def _fails(runner, cli, path, *, contains=""):
    result = runner.invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), result.stderr
    assert contains in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    return lines[0]


def test_caffemodel_layer_table(runner, cli, reference):
    out = _ok(runner, cli, reference / MODEL)
    assert "net: CIFAR10_quick" in out
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert "32x3x5x5, 32" in rows["conv1"] and rows["conv1"].endswith("2,432")
    assert "64x1024, 64" in rows["ip1"] and "3x64, 3" in rows["ip2"]
    assert rows["total"].endswith("145,123")
    info = json.loads(_ok(runner, cli, "--json", reference / MODEL))
    assert info["kind"] == "caffemodel" and info["total_params"] == 145_123


def test_mean_json_channel_means(runner, cli, reference):
    info = json.loads(_ok(runner, cli, "--json", reference / MEAN))
    assert info["kind"] == "mean" and info["shape"] == [3, 36, 36] and info["channel_order"] == "BGR"
    np.testing.assert_allclose(info["channel_means"], FOLD1_CHANNEL_MEANS, atol=0.006)
    assert "channel means (B, G, R): 119.338, 97.267, 118.565" in _ok(runner, cli, reference / MEAN)


def test_solverstate(runner, cli, reference):
    info = json.loads(_ok(runner, cli, "--json", reference / "1_caffenet_train_w32_iter_600000.solverstate"))
    assert (info["kind"], info["iter"], info["history_count"], info["current_step"]) == ("solverstate", 600000, 10, 5)
    assert info["learned_net"].endswith(MODEL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_database(runner, cli, tmp_path, backend):
    path = tmp_path / "DB_train_1"  # recognised by its files, not its name
    rng = np.random.default_rng(0)
    labels = [0, 1, 2, 2, 1, 2, 0]
    with open_writer(path, backend) as writer:
        for index, label in enumerate(labels):
            patch = rng.integers(0, 256, (3, 36, 36), dtype=np.uint8)
            writer.put(make_key(index, f"CLL/x_{index}.tif"), serialize_datum(patch, label))
    info = json.loads(_ok(runner, cli, "--json", "--limit", "2", path))
    assert info["kind"] == "db" and info["backend"] == backend and info["records"] == len(labels)
    assert info["first_keys"] == ["00000000_CLL/x_0.tif", "00000001_CLL/x_1.tif"]
    assert info["datum_shape"] == [3, 36, 36]
    assert info["label_histogram"] == {"0": 2, "1": 2, "2": 3}
    text = _ok(runner, cli, path)
    assert "records: 7" in text and "labels: 0: 2, 1: 2, 2: 3" in text
    assert text.index("first keys") < text.index("records: 7")  # what is known first, the scan's totals after


def test_db_header_comes_before_the_scan(tmp_path):
    # `inspect DB` prints the backend and first keys (its first record parsed) at start-up speed: no numpy yet
    import subprocess
    import sys

    with open_writer(tmp_path / "db", "lmdb") as writer:
        for index in range(3):
            writer.put(make_key(index, "p"), serialize_datum(np.zeros((1, 2, 2), np.uint8), index))
    probe = ("import sys\nfrom lymph_cv.formats.inspect_db import describe_db\nseen = []\n"
             f"info = describe_db({str(tmp_path / 'db')!r}, 2, on_header=lambda h: seen.append("
             "(h['first_keys'], [m for m in ('numpy', 'cv2', 'tqdm') if m in sys.modules])))\n"
             "print(seen, info['records'])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[(['00000000_p', '00000001_p'], [])] 3"


def test_net_and_solver_prototxt(runner, cli, tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(
        'name: "q"\nlayers { name: "d" type: DATA top: "data" top: "label" include { phase: TRAIN } }\n'
        'layers { name: "ip" type: INNER_PRODUCT bottom: "data" top: "ip" }\n'
    )
    info = json.loads(_ok(runner, cli, "--json", net))
    assert info["kind"] == "net" and info["format"] == "V1"
    assert [(l["name"], l["type"], l["phase"]) for l in info["layers"]] == [("d", "Data", "TRAIN"), ("ip", "InnerProduct", None)]
    assert "net: q (V1 syntax, upgraded to V2)" in _ok(runner, cli, net)
    (tmp_path / "v2.prototxt").write_text('layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" }\n')
    assert "net: - (V2 syntax)\n" in _ok(runner, cli, tmp_path / "v2.prototxt")
    (tmp_path / "inputs.prototxt").write_text(
        'input: "data"\ninput_shape { dim: 10 dim: 3 dim: 32 dim: 32 }\ninput: "label"\ninput_shape { dim: 10 }\n'
        'layer { name: "r" type: "ReLU" bottom: "data" top: "data" }\n')
    assert "inputs: data 10x3x32x32, label 10\n" in _ok(runner, cli, tmp_path / "inputs.prototxt")
    (tmp_path / "dims.prototxt").write_text('input: "a"\ninput: "b"\n' + "input_dim: 1\ninput_dim: 3\ninput_dim: 8\ninput_dim: 8\n" * 2)
    assert "inputs: a 1x3x8x8, b 1x3x8x8\n" in _ok(runner, cli, tmp_path / "dims.prototxt")
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "net.prototxt"\nbase_lr: 0.001\nsolver_type: ADAGRAD\n')
    info = json.loads(_ok(runner, cli, "--json", solver))
    assert info["kind"] == "solver" and info["fields"]["type"] == "AdaGrad"
    assert 'type: "AdaGrad"' in _ok(runner, cli, solver)


def test_bad_inputs_give_one_line_errors(runner, cli, reference, tmp_path):
    model = (reference / MODEL).read_bytes()
    (tmp_path / "cut.caffemodel").write_bytes(model[: len(model) // 2])
    _fails(runner, cli, tmp_path / "cut.caffemodel", contains="expected a Caffe model")
    mean = (reference / MEAN).read_bytes()
    (tmp_path / "cut.binaryproto").write_bytes(mean[:-7])
    _fails(runner, cli, tmp_path / "cut.binaryproto", contains="mean file")
    (tmp_path / "noise.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    _fails(runner, cli, tmp_path / "noise.bin", contains="not a recognised Caffe file")
    (tmp_path / "empty").write_bytes(b"")
    _fails(runner, cli, tmp_path / "empty", contains="not a recognised Caffe file")
    _fails(runner, cli, reference / "train_w32_parent_1.txt", contains="not a recognised Caffe file")
    (tmp_path / "bad.prototxt").write_text('name: "x"\nlayer {\n  nme: "a"\n}\n')
    _fails(runner, cli, tmp_path / "bad.prototxt", contains="line 3")
    _fails(runner, cli, tmp_path / "missing.caffemodel", contains="no such file")
    (tmp_path / "dir").mkdir()
    _fails(runner, cli, tmp_path / "dir", contains="LevelDB")
    with open_writer(tmp_path / "notdatum", "lmdb") as writer:
        writer.put(b"k", os.urandom(64))
    _fails(runner, cli, tmp_path / "notdatum", contains="record 0")


def test_database_of_encoded_datums(runner, cli, tmp_path):
    import cv2

    from lymph_cv.formats.caffe.datum import encoded_datum

    path = tmp_path / "enc"
    ok, png = cv2.imencode(".png", np.zeros((4, 6, 3), np.uint8))
    assert ok
    with open_writer(path, "leveldb") as writer:
        for index in range(3):
            writer.put(make_key(index, "a.png"), encoded_datum(png.tobytes(), index).SerializeToString())
    info = json.loads(_ok(runner, cli, "--json", path))
    assert info["encoded"] == 3 and info["datum_shape"] == [3, 4, 6] and info["records"] == 3


def test_unknown_layer_type_is_refused_like_caffe(runner, cli, tmp_path):
    unknown = 'layer { name: "x" type: "Foo" bottom: "data" top: "x" }\n'
    for name in ("net.prototxt", "net.txt"):  # a net by its contents, whatever its name
        (tmp_path / name).write_text('input: "data"\n' + unknown)
        line = _fails(runner, cli, tmp_path / name, contains="layer 'x' has type 'Foo', not a Caffe layer type")
        assert "(valid: AbsVal, " in line and "InnerProduct" in line
    with pytest.raises(FormatError, match="layer 'x' has type 'Foo'"):
        describe(tmp_path / "net.txt")
    (tmp_path / "v1.prototxt").write_text('name: "q"\nlayers { name: "x" type: FOO bottom: "data" top: "x" }\n')
    line = _fails(runner, cli, tmp_path / "v1.prototxt", contains="line 2, column 26: layer 'x' has type FOO")
    assert "not a Caffe V1 layer type (valid: ABSVAL, " in line


@pytest.mark.parametrize("arch", arch_names())
def test_every_rendered_prototxt_inspects(runner, cli, tmp_path, arch):
    variants = [{"arch": arch}] + ([{"arch": arch, "legacy_v1": True}] if arch.startswith("alexnet") else [])
    for index, options in enumerate(variants):
        files = rendered(tmp_path / str(index), **options)
        for path in (files.net, files.deploy):
            assert json.loads(_ok(runner, cli, "--json", path))["kind"] == "net"
        assert json.loads(_ok(runner, cli, "--json", files.solver))["kind"] == "solver"
    (tmp_path / "encoder.prototxt").write_text(render_deploy_text(arch, 2, 32))  # the MIL instance encoder
    assert json.loads(_ok(runner, cli, "--json", tmp_path / "encoder.prototxt"))["kind"] == "net"
