"""Prototxt nets and solvers: parse, V1 → V2 upgrade, phase filtering, printing, errors."""
from __future__ import annotations

import pytest

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.prototxt import (
    CAFFE_LAYER_TYPES,
    V1_TYPE_NAMES,
    check_layer_types,
    filter_net,
    format_text,
    parse_net_text,
    parse_solver_text,
    read_net_prototxt,
    read_solver,
    write_prototxt,
)
from lymph_cv.errors import FormatError

# A V1 net in the tutorial's style (written for this test).
V1_NET = """
name: "quick"
layers {
  name: "train_data"  type: DATA  top: "data"  top: "label"
  data_param { source: "DB_train_1" batch_size: 128 mean_file: "m.binaryproto" crop_size: 32 mirror: True }
  include { phase: TRAIN }
}
layers {
  name: "test_data"  type: DATA  top: "data"  top: "label"
  data_param { source: "DB_test_1" batch_size: 128 mean_file: "m.binaryproto" crop_size: 32 }
  include { phase: TEST }
}
layers {
  name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2
  convolution_param { num_output: 32 pad: 2 kernel_size: 5 stride: 1
    weight_filler { type: "gaussian" std: 0.0001 } bias_filler { type: "constant" } }
}
layers { name: "ip" type: INNER_PRODUCT bottom: "conv1" top: "ip" blobs_lr: 1 blobs_lr: 2 weight_decay: 0
  inner_product_param { num_output: 3 } }
layers { name: "accuracy" type: ACCURACY bottom: "ip" bottom: "label" top: "accuracy" include { phase: TEST } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip" bottom: "label" top: "loss" }
"""

SOLVER = """
net: "1-net.prototxt"
test_iter: 12
test_interval: 10000
base_lr: 0.001
lr_policy: "fixed"
max_iter: 600000
solver_mode: GPU
solver_type: ADAGRAD
"""


def test_v1_net_is_upgraded_like_caffe():
    net = parse_net_text(V1_NET)
    assert len(net.layers) == 0
    assert [l.type for l in net.layer] == ["Data", "Data", "Convolution", "InnerProduct", "Accuracy", "SoftmaxWithLoss"]
    train = net.layer[0]
    assert train.transform_param.mirror and train.transform_param.crop_size == 32
    assert train.transform_param.mean_file == "m.binaryproto"
    assert not train.data_param.HasField("mean_file") and not train.data_param.HasField("crop_size")
    assert train.include[0].phase == caffe_pb2.TRAIN
    assert not net.layer[1].transform_param.HasField("mirror")
    conv, ip = net.layer[2], net.layer[3]
    assert [(p.lr_mult, p.HasField("decay_mult")) for p in conv.param] == [(1, False), (2, False)]
    assert [(p.lr_mult, p.decay_mult) for p in ip.param] == [(1, 0), (2, 1)]
    assert conv.convolution_param.weight_filler.std == pytest.approx(1e-4)


def test_filter_net_by_phase():
    net = parse_net_text(V1_NET)
    train = filter_net(net, caffe_pb2.TRAIN)
    test = filter_net(net, caffe_pb2.TEST)
    assert [l.name for l in train.layer] == ["train_data", "conv1", "ip", "loss"]
    assert [l.name for l in test.layer] == ["test_data", "conv1", "ip", "accuracy", "loss"]
    assert test.state.phase == caffe_pb2.TEST
    staged = parse_net_text(
        'layer { name: "a" type: "ReLU" include { stage: "deploy" } }\n'
        'layer { name: "b" type: "ReLU" exclude { min_level: 1 } }\n'
        'layer { name: "c" type: "ReLU" include { phase: TEST not_stage: "x" } }'
    )
    assert [l.name for l in filter_net(staged, caffe_pb2.TEST, 0, ["deploy"]).layer] == ["a", "b", "c"]
    assert [l.name for l in filter_net(staged, caffe_pb2.TEST, 2, ["x"]).layer] == []
    both = parse_net_text('layer { name: "d" include { phase: TEST } exclude { phase: TRAIN } }')
    with pytest.raises(FormatError, match="not both"):
        filter_net(both, caffe_pb2.TEST)


def test_print_and_parse_round_trip(tmp_path):
    net = parse_net_text(V1_NET)
    path = tmp_path / "net.prototxt"
    write_prototxt(path, net)
    assert read_net_prototxt(path) == net
    assert 'type: "Convolution"' in format_text(net)


def test_solver_type_becomes_type_string(tmp_path):
    solver = parse_solver_text(SOLVER)
    assert solver.type == "AdaGrad" and not solver.HasField("solver_type")
    assert solver.test_iter == [12] and solver.base_lr == pytest.approx(0.001)
    path = tmp_path / "solver.prototxt"
    path.write_text('type: "Adam"\nbase_lr: 0.1\n')
    assert read_solver(path).type == "Adam"
    path.write_text('type: "Adam"\nsolver_type: SGD\n')
    with pytest.raises(FormatError, match="both 'solver_type' and 'type'"):
        read_solver(path)


def test_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text('name: "x"\nlayer {\n  name: "a"\n  typo: "b"\n}\n')
    with pytest.raises(FormatError) as info:
        read_net_prototxt(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line 4") and "typo" in message and "\n" not in message
    path.write_text('layer { name: "a" }\nlayers { name: "b" }\n')
    with pytest.raises(FormatError, match="both 'layer' and legacy 'layers'"):
        read_net_prototxt(path)
    with pytest.raises(FormatError, match="no such file"):
        read_solver(tmp_path / "missing.prototxt")
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(FormatError, match="not a text file"):
        read_net_prototxt(path)


def test_unknown_layer_types_are_refused_like_caffe(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('layer { name: "d" type: "Input" top: "data" }\nlayer { name: "x" type: "Foo" bottom: "data" top: "x" }\n')
    with pytest.raises(FormatError) as info:
        check_layer_types(read_net_prototxt(path), path)
    message = str(info.value)
    assert message.startswith(f"{path}: layer 'x' has type 'Foo', not a Caffe layer type (valid: AbsVal, ")
    assert "InnerProduct" in message and "\n" not in message
    path.write_text('layer { name: "x" bottom: "data" top: "x" }\n')
    with pytest.raises(FormatError, match="layer 'x' has no type"):
        check_layer_types(read_net_prototxt(path), path)
    check_layer_types(parse_net_text(V1_NET), path)  # every upgraded V1 type is one of Caffe's


@pytest.mark.parametrize("token", ["FOO", "77"])
def test_unknown_v1_layer_type_names_its_layer(tmp_path, token):
    path = tmp_path / "v1.prototxt"
    path.write_text(V1_NET.replace("name: \"ip\" type: INNER_PRODUCT", f"name: \"ip\" type: {token}"))
    with pytest.raises(FormatError) as info:
        read_net_prototxt(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line 19, column 27: layer 'ip' has type {token}, not a Caffe V1 layer type")
    assert "(valid: ABSVAL, ACCURACY, " in message and "INNER_PRODUCT" in message and "NONE" not in message


def test_caffe_layer_types_cover_the_v1_types_and_the_engine():
    from lymph_cv.net.layers import supported_types

    assert len(CAFFE_LAYER_TYPES) == len(set(CAFFE_LAYER_TYPES)) == 61
    assert set(V1_TYPE_NAMES.values()) - {""} <= set(CAFFE_LAYER_TYPES)
    assert set(supported_types()) <= set(CAFFE_LAYER_TYPES)  # a net we run is one Caffe knows
