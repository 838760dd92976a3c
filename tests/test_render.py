"""lymph-cv render: the per-fold solver, train/test net and deploy net."""
from __future__ import annotations

import json

import pytest
from google.protobuf import text_format

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.prototxt import read_net_prototxt, read_solver
from lymph_cv.errors import ConfigError
from lymph_cv.stages.render import render_fold
from netutil import CLASSES, TEST_LINES, rendered, write_lists

# The tutorial's published templates (choosehappy/public, "DL tutorial Code/common/"), as data.
# Each trunk layer: (name, V1 type, bottoms, tops, blobs_lr, layer-specific fields).
CONV = "convolution_param"
POOL = "pooling_param"
IP = "inner_product_param"


def _conv(num_output, std):
    return {CONV: {"num_output": num_output, "pad": [2], "kernel_size": [5], "stride": [1],
                   "weight_filler": {"type": "gaussian", "std": std}, "bias_filler": {"type": "constant"}}}


def _pool(method):
    return {POOL: {"pool": method, "kernel_size": 3, "stride": 2}}


def _ip(num_output):
    return {IP: {"num_output": num_output, "weight_filler": {"type": "gaussian", "std": 0.1},
                 "bias_filler": {"type": "constant"}}}


PUBLISHED_TRUNK = [
    ("conv1", "CONVOLUTION", ["data"], ["conv1"], [1, 2], _conv(32, 0.0001)),
    ("pool1", "POOLING", ["conv1"], ["pool1"], [], _pool("MAX")),
    ("relu1", "RELU", ["pool1"], ["pool1"], [], {}),
    ("conv2", "CONVOLUTION", ["pool1"], ["conv2"], [1, 2], _conv(32, 0.01)),
    ("relu2", "RELU", ["conv2"], ["conv2"], [], {}),
    ("pool2", "POOLING", ["conv2"], ["pool2"], [], _pool("AVE")),
    ("conv3", "CONVOLUTION", ["pool2"], ["conv3"], [1, 2], _conv(64, 0.01)),
    ("relu3", "RELU", ["conv3"], ["conv3"], [], {}),
    ("pool3", "POOLING", ["conv3"], ["pool3"], [], _pool("AVE")),
    ("ip1", "INNER_PRODUCT", ["pool3"], ["ip1"], [1, 2], _ip(64)),
]
PUBLISHED_DROPOUT_AFTER_IP1 = [
    ("relu4", "RELU", ["ip1"], ["ip1"], [], {}),
    ("drop4", "DROPOUT", ["ip1"], ["ip1"], [], {"dropout_param": {"dropout_ratio": 0.5}}),
]
PUBLISHED_DROPOUT_AFTER_IP2 = [
    ("relu5", "RELU", ["ip2"], ["ip2"], [], {}),
    ("drop5", "DROPOUT", ["ip2"], ["ip2"], [], {"dropout_param": {"dropout_ratio": 0.5}}),
]
# ip2 has 2 outputs in common/, 3 in the lymphoma models; we derive it from the labels.
IP2 = ("ip2", "INNER_PRODUCT", ["ip1"], ["ip2"], [1, 2], _ip(CLASSES))
PUBLISHED_DATA = [
    ("cifar_train", "../DB_train_{k}", True, "TRAIN"),
    ("cifar_test", "../DB_test_{k}", False, "TEST"),
]
PUBLISHED_TAIL = [
    ("accuracy", "ACCURACY", ["ip2", "label"], ["accuracy"], [], {}),
    ("loss", "SOFTMAX_LOSS", ["ip2", "label"], ["loss"], [], {}),
]
PUBLISHED_SOLVER = {
    "test_interval": 10000, "base_lr": 0.001, "lr_policy": "fixed", "display": 1000, "max_iter": 600000,
    "weight_decay": 0.004, "snapshot": 10000,
}


def _published_trunk(dropout: bool):
    trunk = list(PUBLISHED_TRUNK)
    if dropout:
        trunk += PUBLISHED_DROPOUT_AFTER_IP1
    trunk.append(IP2)
    if dropout:
        trunk += PUBLISHED_DROPOUT_AFTER_IP2
    return trunk


def _check_fields(message, expected: dict) -> None:
    for key, value in expected.items():
        actual = getattr(message, key)
        if isinstance(value, dict):
            _check_fields(actual, value)
        elif isinstance(value, list):
            assert list(actual) == value, key
        elif isinstance(value, str) and key in ("pool",):
            assert caffe_pb2.PoolingParameter.PoolMethod.Name(actual) == value
        elif isinstance(value, float):
            assert actual == pytest.approx(value, rel=1e-6), key
        else:
            assert actual == value, key


def _check_v1_layer(layer, spec) -> None:
    name, type_name, bottoms, tops, blobs_lr, fields = spec
    assert layer.name == name
    assert caffe_pb2.V1LayerParameter.LayerType.Name(layer.type) == type_name
    assert list(layer.bottom) == bottoms and list(layer.top) == tops
    assert list(layer.blobs_lr) == blobs_lr and not len(layer.weight_decay)
    assert not len(layer.include) or name in ("accuracy",)
    _check_fields(layer, fields)


def _raw(path, message):
    return text_format.Parse(path.read_text(), message)


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
def test_legacy_v1_matches_published_templates_field_by_field(tmp_path, dropout):
    files = rendered(tmp_path, fold=2, dropout=dropout, legacy_v1=True, device="cuda")
    net = _raw(files.net, caffe_pb2.NetParameter())
    assert net.name == "CIFAR10_quick" and not len(net.layer)
    layers = list(net.layers)
    for layer, (name, source, mirror, phase) in zip(layers[:2], PUBLISHED_DATA):
        assert layer.name == name and layer.type == caffe_pb2.V1LayerParameter.DATA
        assert list(layer.top) == ["data", "label"]
        assert layer.data_param.source == source.format(k=2)
        assert layer.data_param.batch_size == 128
        assert not layer.data_param.HasField("backend")  # published: the LEVELDB default
        assert layer.transform_param.mean_file == "../DB_train_w32_2.binaryproto"
        assert layer.transform_param.crop_size == 32
        assert layer.transform_param.mirror is mirror
        assert [caffe_pb2.Phase.Name(rule.phase) for rule in layer.include] == [phase]
    expected = _published_trunk(dropout) + PUBLISHED_TAIL
    assert [layer.name for layer in layers[2:]] == [spec[0] for spec in expected]
    for layer, spec in zip(layers[2:], expected):
        _check_v1_layer(layer, spec)
    assert [caffe_pb2.Phase.Name(r.phase) for r in layers[-2].include] == ["TEST"]

    deploy = _raw(files.deploy, caffe_pb2.NetParameter())
    assert list(deploy.input) == ["data"] and list(deploy.input_dim) == [10, 3, 32, 32]
    trunk = _published_trunk(dropout)
    assert [layer.name for layer in deploy.layers] == [spec[0] for spec in trunk] + ["prob"]
    for layer, spec in zip(deploy.layers, trunk):
        _check_v1_layer(layer, spec)
    prob = deploy.layers[-1]
    assert prob.type == caffe_pb2.V1LayerParameter.SOFTMAX and list(prob.bottom) == ["ip2"]

    solver = _raw(files.solver, caffe_pb2.SolverParameter())
    assert solver.net == "2-alexnet_traing_32w_db.prototxt"
    assert list(solver.test_iter) == [TEST_LINES // 128]
    _check_fields(solver, PUBLISHED_SOLVER)
    assert solver.snapshot_prefix == "2_caffenet_train_w32" + ("_dropout" if dropout else "")
    assert solver.solver_mode == caffe_pb2.SolverParameter.GPU
    assert solver.solver_type == caffe_pb2.SolverParameter.ADAGRAD and not solver.HasField("type")
    for field in ("momentum", "gamma", "stepsize", "delta"):
        assert not solver.HasField(field)


def test_v2_files_parse_and_build_consistent_nets(tmp_path):
    files = rendered(tmp_path)
    v1 = rendered(tmp_path / "v1", legacy_v1=True)
    solver = read_solver(files.solver)
    assert solver.type == "AdaGrad" and solver.solver_mode == caffe_pb2.SolverParameter.CPU
    _check_fields(solver, PUBLISHED_SOLVER)
    net, net_v1 = read_net_prototxt(files.net), read_net_prototxt(v1.net)
    assert [layer.data_param.backend for layer in net.layer[:2]] == [caffe_pb2.DataParameter.LEVELDB] * 2
    for layer in net_v1.layer:
        layer.data_param.backend = caffe_pb2.DataParameter.LEVELDB if layer.type == "Data" else 0
        if layer.type != "Data":
            layer.ClearField("data_param")
    # V2 rendering = the upgraded V1 rendering (same layers, multipliers, rules).
    assert text_format.MessageToString(net) == text_format.MessageToString(net_v1)
    deploy = read_net_prototxt(files.deploy)
    assert [layer.name for layer in deploy.layer][-1] == "prob"
    record = json.loads((files.net.parent / "render.json").read_text())
    assert record["test_iter"] == TEST_LINES // 128 and record["num_classes"] == CLASSES
    assert record["backend"] == "leveldb"


def test_cli_renders_every_fold_with_overrides(tmp_path, runner, cli):
    write_lists(tmp_path, folds=(1, 2, 3))
    result = runner.invoke(cli, ["render", str(tmp_path), "--folds", "1-2", "--set", "max_iter=2000",
                                 "--set", "test_interval=500", "--set", "snapshot=500", "--set", "batch_size=64"])
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "3").exists()
    for fold in (1, 2):
        solver = read_solver(tmp_path / str(fold) / f"{fold}-alexnet_solver_ada.prototxt")
        assert (solver.max_iter, solver.test_interval, solver.snapshot) == (2000, 500, 500)
        assert list(solver.test_iter) == [TEST_LINES // 64]
        net = read_net_prototxt(tmp_path / str(fold) / f"{fold}-alexnet_traing_32w_db.prototxt")
        assert [layer.data_param.batch_size for layer in net.layer[:2]] == [64, 64]
    result = runner.invoke(cli, ["render", str(tmp_path), "--set", "lr_policy=multistep", "--set", "gamma=0.1",
                                 "--set", "stepvalue=100,300", "--set", "solver_type=SGD", "--set", "momentum=0.9"])
    assert result.exit_code == 0 and (tmp_path / "3" / "deploy_train32.prototxt").exists()
    solver = read_solver(tmp_path / "3" / "3-alexnet_solver_ada.prototxt")
    assert (solver.lr_policy, list(solver.stepvalue), solver.type) == ("multistep", [100, 300], "SGD")
    assert solver.gamma == pytest.approx(0.1) and solver.momentum == pytest.approx(0.9)


@pytest.mark.parametrize("args, expected", [
    (["--set", "max_itr=5"], "unknown template variable 'max_itr' (valid: "),
    (["--set", "max_iter=abc"], "max_iter=abc"),
    (["--set", "lr_policy=cosine"], "must be one of fixed, step"),
    (["--set", "noequals"], "expected key=value"),
    (["--set", "lr_policy=step"], "lr_policy step needs --set gamma=..., stepsize=..."),
    (["--set", "snapshot_prefix=a\"b"], "without quotes"),
    (["--folds", "9"], "no test_w32_K.txt for fold(s) 9"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, runner, cli, args, expected):
    write_lists(tmp_path)
    result = runner.invoke(cli, ["render", str(tmp_path), *args])
    assert result.exit_code == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "1").exists()


def test_cli_usage_errors(tmp_path, runner, cli):
    write_lists(tmp_path)
    for args in (["--folds", "x"], ["--device", "tpu"]):
        result = runner.invoke(cli, ["render", str(tmp_path), *args])
        assert result.exit_code == 2 and result.stderr.startswith(f"error: {args[0]}: ")
    result = runner.invoke(cli, ["render", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "work directory not found" in result.stderr


def test_bad_list_line_names_file_and_line(tmp_path):
    write_lists(tmp_path)
    (tmp_path / "test_w32_1.txt").write_text("a.png\t0\nb.png\tX\n")
    with pytest.raises(Exception) as info:
        render_fold(tmp_path, 1)
    assert "test_w32_1.txt: line 2" in str(info.value)


def test_backend_and_channels_derived_from_workdir(tmp_path):
    import numpy as np

    from lymph_cv.formats.caffe.blob import write_mean

    write_lists(tmp_path, classes=5)
    (tmp_path / "dbs.json").write_text(json.dumps({"backend": "lmdb"}))
    write_mean(tmp_path / "DB_train_w32_1.binaryproto", np.zeros((1, 36, 36), np.float32))
    for legacy in (False, True):
        files = render_fold(tmp_path, 1, legacy_v1=legacy)
        net = read_net_prototxt(files.net)
        assert [layer.data_param.backend for layer in net.layer[:2]] == [caffe_pb2.DataParameter.LMDB] * 2
        deploy = _raw(files.deploy, caffe_pb2.NetParameter())
        assert list(deploy.input_dim) == [10, 1, 32, 32]
        ip2 = [layer for layer in net.layer if layer.name == "ip2"][0]
        assert ip2.inner_product_param.num_output == 5


@pytest.mark.parametrize("pair, message", [
    ("max_iter=abc", "--set max_iter=abc: expected an integer, got 'abc'"),
    ("stepvalue=1,a", "--set stepvalue=1,a: expected an integer, got 'a'"),
    ("base_lr=x", "--set base_lr=x: expected a number, got 'x'"),
    ("base_lr=nan", "--set base_lr=nan: expected a finite number, got 'nan'"),
    ("dropout_ratio=inf", "--set dropout_ratio=inf: expected a finite number, got 'inf'"),
    ("base_lr=-1", "--set base_lr=-1: must be > 0"),  # rendered, then refused by train
    ("base_lr=0", "--set base_lr=0: must be > 0"),
    ("net_name=a\nb", "--set net_name='a\\nb': must be non-empty, without quotes, backslashes or line breaks"),
])
def test_set_values_of_the_wrong_type_say_what_was_expected(pair, message):
    """They used to print Python's 'invalid literal for int()', render nan, or (inf ratio) crash."""
    from lymph_cv.stages.render import parse_overrides, resolve_variables

    with pytest.raises(ConfigError) as caught:
        resolve_variables(parse_overrides([pair]))
    assert str(caught.value) == message


def test_fold_folder_that_is_a_file_is_one_error_line(tmp_path, runner, cli):
    """It used to end in a FileExistsError traceback."""
    write_lists(tmp_path)
    (tmp_path / "1").write_text("not a folder")
    result = runner.invoke(cli, ["render", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr == f"error: {tmp_path / '1'}: is a file; expected a folder\n"
