"""ONNX export: onnxruntime gives our forward pass's values (≤ 1e-5), the published models included."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from lymph_cv.errors import ConfigError, UnsupportedError
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.prototxt import parse_net_text
from lymph_cv.net.build import build_net
from lymph_cv.net.onnx_export import computed_blobs, to_onnx, verify
from lymph_cv.stages.render import render_fold

#: Every layer option the exporter spells out: padded MAX/AVE pooling with Caffe's rounding (pool2
#: drops a window that would start in the pad), both LRN regions, leaky ReLU, a transposed inner
#: product, global pooling, dropout, softmax.
EDGE_NET = """
name: "edges"
input: "data"
input_shape { dim: 1 dim: 3 dim: 13 dim: 13 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 stride: 1 group: 1 weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "pool1" top: "pool1" relu_param { negative_slope: 0.1 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 group: 2 weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.2 } } }
layer { name: "pool2" type: "Pooling" bottom: "conv1" top: "pool2" pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "norm2" type: "LRN" bottom: "pool2" top: "norm2" lrn_param { local_size: 3 alpha: 0.3 beta: 0.5 norm_region: WITHIN_CHANNEL } }
layer { name: "pool3" type: "Pooling" bottom: "norm2" top: "pool3" pooling_param { pool: AVE global_pooling: true } }
layer { name: "pool4" type: "Pooling" bottom: "conv2" top: "pool4" pooling_param { pool: MAX global_pooling: true } }
layer { name: "drop" type: "Dropout" bottom: "pool3" top: "pool3" dropout_param { dropout_ratio: 0.5 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool3" top: "ip1"
  inner_product_param { num_output: 5 transpose: true weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "pool4" top: "ip2" inner_product_param { num_output: 5 bias_term: false weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "prob" type: "Softmax" bottom: "ip1" top: "prob" }
"""
#: The other layer types (ResNets' BatchNorm, Scale, Eltwise and the rest of the registry).
MORE_NET = """
name: "more"
input: "data"
input_shape { dim: 1 dim: 4 dim: 6 dim: 6 }
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param { eps: 0.001 } }
layer { name: "scale" type: "Scale" bottom: "bn" top: "bn" scale_param { bias_term: true filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "split" type: "Split" bottom: "bn" top: "a" top: "b" }
layer { name: "sig" type: "Sigmoid" bottom: "a" top: "sig" }
layer { name: "tanh" type: "TanH" bottom: "b" top: "tanh" }
layer { name: "sum" type: "Eltwise" bottom: "sig" bottom: "tanh" top: "sum" eltwise_param { operation: SUM coeff: 2 coeff: -0.5 } }
layer { name: "prod" type: "Eltwise" bottom: "sig" bottom: "tanh" bottom: "sum" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "prod" bottom: "sum" top: "max" eltwise_param { operation: MAX } }
layer { name: "elu" type: "ELU" bottom: "max" top: "elu" elu_param { alpha: 0.7 } }
layer { name: "prelu" type: "PReLU" bottom: "elu" top: "prelu" prelu_param { filler { type: "gaussian" std: 0.5 } } }
layer { name: "bias" type: "Bias" bottom: "prelu" top: "bias" bias_param { axis: 1 num_axes: 2 filler { type: "gaussian" std: 1 } } }
layer { name: "gate" type: "Pooling" bottom: "bias" top: "gate" pooling_param { pool: AVE global_pooling: true } }
layer { name: "gate_flat" type: "Flatten" bottom: "gate" top: "gate_flat" }
layer { name: "gated" type: "Scale" bottom: "bias" bottom: "gate_flat" top: "gated" scale_param { axis: 0 } }
layer { name: "cat" type: "Concat" bottom: "gated" bottom: "sum" top: "cat" concat_param { axis: 1 } }
layer { name: "flat" type: "Flatten" bottom: "cat" top: "flat" flatten_param { axis: 2 } }
layer { name: "reshape" type: "Reshape" bottom: "flat" top: "reshape" reshape_param { shape { dim: 0 dim: -1 dim: 12 } } }
"""
TOLERANCE = 1e-5


def _edge_net():
    net = build_net(parse_net_text(EDGE_NET), caffe_pb2.TEST)
    net.init_params(torch.Generator().manual_seed(3))
    return net.eval()


def test_every_converter_matches_our_forward():
    net = _edge_net()
    assert net.blob_shapes["pool2"] == (1, 6, 7, 7)  # 13 + 2 pad, kernel 2, stride 2, rounded up: 8, minus the pad start
    model = to_onnx(net, outputs=computed_blobs(net))
    check = verify(net, model, batch=3, scale=2.0)
    assert set(check.blobs) == {"conv1", "pool1", "norm1", "conv2", "pool2", "norm2", "pool3", "pool4", "ip1", "ip2", "prob"}
    assert check.max_abs_diff <= TOLERANCE, check.blobs
    ops = {node.op_type for node in model.graph.node}
    assert {"Pad", "Slice", "LRN", "LeakyRelu", "GlobalAveragePool", "GlobalMaxPool", "Gemm", "Softmax", "Pow"} <= ops
    # The plain export exposes the deploy net's outputs by their blob names, batch size free.
    plain = to_onnx(net, opset=13)
    assert [o.name for o in plain.graph.output] == net.output_blobs == ["ip2", "prob"]
    assert plain.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert plain.opset_import[0].version == 13


def _randomise_statistics(net, seed=1):
    """BatchNorm statistics and Scale blobs away from their identity defaults."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.layers:
            if layer.type_name == "BatchNorm":
                channels = layer.blobs[0].shape[0]
                layer.blobs[0].copy_(torch.randn(channels, generator=generator) * 0.3)
                layer.blobs[1].copy_(torch.rand(channels, generator=generator) * 2 + 0.5)
                layer.blobs[2].fill_(2.0)  # the weight sum the statistics are divided by
            elif layer.type_name == "Scale" and layer.learned:
                layer.blobs[0].copy_(torch.randn(layer.blobs[0].shape, generator=generator) * 0.3 + 1)


def test_more_layer_types_match_our_forward():
    net = build_net(parse_net_text(MORE_NET), caffe_pb2.TEST)
    net.init_params(torch.Generator().manual_seed(5))
    _randomise_statistics(net)
    check = verify(net.eval(), to_onnx(net, outputs=computed_blobs(net)), batch=3, scale=1.0)
    assert {"bn", "a", "b", "sum", "prod", "max", "prelu", "gated", "cat", "reshape"} <= set(check.blobs)
    assert check.max_abs_diff <= TOLERANCE, check.blobs


@pytest.mark.parametrize("arch", ["resnet18"])
def test_resnets_export(tmp_path, arch):
    """The ResNets our render writes (BatchNorm, Scale, Eltwise, global pooling), random weights and statistics."""
    from lymph_cv.formats.caffe.prototxt import read_net_prototxt

    for name in ("train_w32_1.txt", "test_w32_1.txt"):
        (tmp_path / name).write_text("".join(f"x_{label}.tif\t{label}\n" for label in range(3)))
    net = build_net(read_net_prototxt(render_fold(tmp_path, 1, arch=arch).deploy), caffe_pb2.TEST)
    net.init_params(torch.Generator().manual_seed(0))
    _randomise_statistics(net)
    model = to_onnx(net.eval(), outputs=computed_blobs(net))
    assert {"BatchNormalization", "Mul", "Add", "Sum"} <= {n.op_type for n in model.graph.node}
    check = verify(net, model, batch=2, scale=1.0)
    assert check.max_rel_diff <= TOLERANCE and check.blobs["prob"] <= TOLERANCE


def test_refusals():
    net = _edge_net()
    with pytest.raises(ConfigError, match="--opset 12: expected 13 to"):
        to_onnx(net, opset=12)
    with pytest.raises(ConfigError, match="no blob 'data'"):
        to_onnx(net, outputs=["data"])
    train = build_net(parse_net_text(EDGE_NET.replace('layer { name: "prob" type: "Softmax" bottom: "ip1" top: "prob" }',
                                                      'input: "label" input_shape { dim: 1 }\n'
                                                      'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }')),
                      caffe_pb2.TEST)
    with pytest.raises(UnsupportedError, match="'SoftmaxWithLoss' has no ONNX export"):
        to_onnx(train)


@pytest.mark.parametrize("variant", ["", "dropout_"])
def test_published_fold1_model_in_onnxruntime(reference, tmp_path, runner, cli, variant):
    """The tutorial's fold-1 models with the deploy net our render writes: equal outputs."""
    for name in ("train_w32_1.txt", "test_w32_1.txt"):
        (tmp_path / name).write_text("".join(f"x_{label}.tif\t{label}\n" for label in range(3)))
    deploy = render_fold(tmp_path, 1).deploy
    model = reference / f"1_caffenet_train_w32_{variant}iter_600000.caffemodel"
    out = tmp_path / "model.onnx"
    result = runner.invoke(cli, ["export", str(model), str(deploy), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "checked in onnxruntime" in result.stderr and result.stdout.strip() == str(out)
    exported = onnx.load(str(out))
    onnx.checker.check_model(exported)

    import onnxruntime

    from lymph_cv.net.onnx_export import load_trained

    net = load_trained(deploy, model)
    net.channels_last = False
    # Pixels minus the published mean, as evaluation feeds them: 10 crops of 3x32x32.
    rng = np.random.default_rng(1)
    crops = (rng.integers(0, 256, (10, 3, 32, 32)) - 118.0).astype(np.float32)
    session = onnxruntime.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    (theirs,) = session.run(["prob"], {"data": crops})
    with torch.inference_mode():
        ours = net.forward({"data": torch.from_numpy(crops)})["prob"].numpy()
    assert theirs.shape == (10, 3)
    assert np.abs(theirs - ours).max() <= TOLERANCE
    # Our all-blob check on the same model: logits and every activation within 1e-5 relative.
    check = verify(net, to_onnx(net, outputs=computed_blobs(net)), batch=4)
    assert check.max_rel_diff <= TOLERANCE and check.blobs["prob"] <= TOLERANCE


def test_cli_export_errors(tmp_path, runner, cli):
    (tmp_path / "m.caffemodel").write_bytes(b"\x00\x01")
    (tmp_path / "deploy.prototxt").write_text(EDGE_NET)
    result = runner.invoke(cli, ["export", str(tmp_path / "m.caffemodel"), str(tmp_path / "deploy.prototxt"),
                                 "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "x.onnx").exists()
