"""The architecture registry: every entry renders, parses, builds and runs; ResNet-18 learns."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lymph_cv.errors import ConfigError
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.blob import write_mean
from lymph_cv.formats.caffe.prototxt import parse_net_text, read_net_prototxt
from lymph_cv.net.archs import ARCHS, arch_names, get_arch
from lymph_cv.net.build import build_net
from lymph_cv.net.solver import learnables_of, make_solver
from lymph_cv.stages.render import render_fold
from lymph_cv.stages.train import test_model as score_model, train
from netutil import CLASSES, write_lists
from trainutil import make_dataset

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST
#: Layer types a real Caffe (master since 2016) knows; rendered nets must use only these.
CAFFE_TYPES = {"Data", "Input", "Convolution", "BatchNorm", "Scale", "ReLU", "Eltwise", "Pooling", "InnerProduct",
               "Dropout", "Accuracy", "SoftmaxWithLoss", "Softmax", "LRN"}


def test_registry_lists_valid_names():
    assert {"alexnet32w", "alexnet32w-dropout", "resnet18", "resnet34", "resnet50"} <= set(arch_names())
    with pytest.raises(ConfigError, match=r"unknown architecture 'vgg'.*valid: alexnet32w"):
        get_arch("vgg")


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_each_arch_renders_parses_builds_and_runs(tmp_path, name):
    write_lists(tmp_path)
    fold = render_fold(tmp_path, 1, arch=name, overrides={"batch_size": "4", "test_iter": "1"})
    record = json.loads((tmp_path / "1" / "render.json").read_text())
    assert record["arch"] == name and record["crop_size"] == 32 and record["patch_size"] == 36
    net_param = read_net_prototxt(fold.net)
    assert {layer.type for layer in net_param.layer} <= CAFFE_TYPES
    head = get_arch(name).head
    shapes = {"data": (4, 3, 32, 32), "label": (4,)}
    for phase in (TEST, TRAIN):
        net = build_net(net_param, phase, input_shapes=shapes)
        assert net.blob_shapes[head] == (4, CLASSES)
    net.init_params(torch.Generator().manual_seed(0))
    with torch.no_grad():  # one TRAIN forward fills BatchNorm's statistics (fresh ones are 0: y = x/sqrt(eps))
        net.forward({"data": torch.randn(4, 3, 32, 32), "label": torch.zeros(4)})
    deploy = build_net(read_net_prototxt(fold.deploy), TEST, input_shapes={"data": (2, 3, 32, 32)})
    deploy.share_weights_from(net)
    with torch.no_grad():
        prob = deploy.forward({"data": torch.randn(2, 3, 32, 32)})["prob"]
    assert prob.shape == (2, CLASSES) and torch.isfinite(prob).all()
    np.testing.assert_allclose(prob.sum(dim=1).numpy(), 1, rtol=1e-5)


def test_stem_follows_patch_size_and_can_be_forced(tmp_path):
    write_lists(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"patch_size": 96}))
    fold = render_fold(tmp_path, 1, arch="resnet18", overrides={"test_iter": "1"})
    record = json.loads((tmp_path / "1" / "render.json").read_text())
    assert (record["stem"], record["crop_size"], record["batch_size"]) == ("imagenet", 88, 64)
    names = [layer.name for layer in read_net_prototxt(fold.deploy).layer]
    assert names[:5] == ["conv1", "bn_conv1", "scale_conv1", "conv1_relu", "pool1"]
    net = build_net(read_net_prototxt(fold.deploy), TEST)
    assert net.blob_shapes["pool1"] == (10, 64, 22, 22) and net.blob_shapes["res5b"] == (10, 512, 3, 3)
    render_fold(tmp_path, 1, arch="resnet18", stem="cifar", overrides={"test_iter": "1"})
    assert json.loads((tmp_path / "1" / "render.json").read_text())["stem"] == "cifar"
    with pytest.raises(ConfigError, match="has no stem"):
        render_fold(tmp_path, 1, stem="cifar")
    with pytest.raises(ConfigError, match="--dropout"):
        render_fold(tmp_path, 1, arch="resnet18", dropout=True)


RESIDUAL = """name: "res"
input: "x" input_shape { dim: 3 dim: 2 dim: 2 dim: 2 }
input: "label" input_shape { dim: 3 }
layer { name: "conv" type: "Convolution" bottom: "x" top: "conv"
  convolution_param { num_output: 2 kernel_size: 1 bias_term: false } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "sum" type: "Eltwise" bottom: "x" bottom: "conv" top: "sum" }
layer { name: "fc" type: "InnerProduct" bottom: "sum" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def test_sgd_steps_through_a_residual_block_match_a_hand_computation():
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((3, 2, 2, 2)), np.array([0, 2, 1])
    w, v, b = rng.standard_normal((2, 2)), rng.standard_normal((3, 8)) * 0.5, rng.standard_normal(3) * 0.1
    net = build_net(parse_net_text(RESIDUAL), TRAIN)
    with torch.no_grad():
        net.layer("conv").blobs[0].copy_(torch.tensor(w.reshape(2, 2, 1, 1)))
        net.layer("fc").blobs[0].copy_(torch.tensor(v))
        net.layer("fc").blobs[1].copy_(torch.tensor(b))
    lr, momentum, decay = 0.1, 0.9, 0.01
    solver = make_solver(caffe_pb2.SolverParameter(base_lr=lr, lr_policy="fixed", momentum=momentum,
                                                   weight_decay=decay, type="SGD"), learnables_of(net))
    history = [np.zeros_like(w), np.zeros_like(v), np.zeros_like(b)]
    for _ in range(2):
        blobs = net.forward({"x": torch.tensor(x, dtype=torch.float32),
                             "label": torch.tensor(labels, dtype=torch.float32)})
        net.loss(blobs).backward()
        solver.apply_update()
        solver.zero_grad()
        # by hand: h = relu(W x) per pixel, s = x + h, logits = V flat(s) + b, mean cross-entropy
        pre = np.einsum("oc,nchw->nohw", w, x)
        s = x + np.maximum(pre, 0)
        logits = s.reshape(3, -1) @ v.T + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dlogits = (p - np.eye(3)[labels]) / 3
        dv, db = dlogits.T @ s.reshape(3, -1), dlogits.sum(0)
        ds = (dlogits @ v).reshape(s.shape)
        dpre = ds * (pre > 0)  # the skip's gradient (ds) goes to x; the branch's through relu
        dw = np.einsum("nohw,nchw->oc", dpre, x)
        for i, (param, grad) in enumerate(((w, dw), (v, dv), (b, db))):
            history[i] = momentum * history[i] + lr * (grad + decay * param)
        w, v, b = w - history[0], v - history[1], b - history[2]
    np.testing.assert_allclose(net.layer("conv").blobs[0].detach().numpy().reshape(2, 2), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.layer("fc").blobs[0].detach().numpy(), v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.layer("fc").blobs[1].detach().numpy(), b, rtol=1e-5, atol=1e-6)


def test_resnet18_learns_a_tiny_db_and_its_snapshot_loads_in_pycaffe(tmp_path):
    from lymph_cv import pycaffe

    make_dataset(tmp_path, n_train=96, n_test=48)
    write_lists(tmp_path, train_lines=96, test_lines=48)
    fold = render_fold(tmp_path, 1, arch="resnet18", overrides={
        "batch_size": "8", "crop_size": "8", "max_iter": "50", "test_interval": "50", "test_iter": "6",
        "snapshot": "50", "display": "25", "base_lr": "0.02", "random_seed": "3"})
    result = train(fold.solver, log_file=False, progress=False)
    assert result.iterations == 50
    model = tmp_path / "1" / "1_caffenet_train_w32_iter_50.caffemodel"
    assert model.is_file()
    scores = dict((name, value) for name, value, _suffix in score_model(fold.net, [model], 6).scores)
    assert scores["accuracy"] > 0.6  # chance is 1/3
    net = pycaffe.Net(str(fold.deploy), str(model), pycaffe.TEST)
    assert [b.data.shape for b in net.params["bn_conv1"]] == [(64,), (64,), (1,)]
    assert net.params["bn_conv1"][2].data[0] > 0  # the moving-average weight was trained and saved
    images = np.random.default_rng(0).normal(0, 30, size=(10, 3, 8, 8)).astype(np.float32)
    prob = net.forward(data=images)["prob"]
    assert prob.shape == (10, CLASSES) and np.isfinite(prob).all()


def test_test_nets_fuse_conv_batchnorm_scale_exactly(tmp_path):
    write_lists(tmp_path)
    fold = render_fold(tmp_path, 1, arch="resnet18", overrides={"test_iter": "1"})
    net = build_net(read_net_prototxt(fold.deploy), TEST, input_shapes={"data": (2, 3, 32, 32)})
    net.init_params(torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in net.layers:
            if layer.type_name == "BatchNorm":
                c = layer.blobs[0].shape[0]
                layer.blobs[0].copy_(torch.randn(c, generator=generator) * 0.1 * 3)
                layer.blobs[1].copy_((torch.rand(c, generator=generator) + 0.5) * 3)
                layer.blobs[2].fill_(3.0)
            elif layer.type_name == "Scale":
                layer.blobs[0].copy_(torch.rand(layer.blobs[0].shape, generator=generator) + 0.5)
                layer.blobs[1].copy_(torch.randn(layer.blobs[1].shape, generator=generator) * 0.1)
    assert len(net._fusion.plan) == 20  # every conv of ResNet-18 (17 + 3 shortcuts)
    x = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        fused = net.forward({"data": x})
        net.fuse_layers = False
        plain = net.forward({"data": x})
    for blob in ("conv1", "res3a", "res5b", "fc"):
        scale = float(plain[blob].abs().max())
        assert float((fused[blob] - plain[blob]).abs().max()) <= 1e-5 * max(1.0, scale), blob
    train_net = build_net(read_net_prototxt(fold.net), TRAIN, input_shapes={"data": (4, 3, 32, 32), "label": (4,)})
    assert not train_net._fusion.plan  # batch statistics: only BatchNorm + Scale share a kernel
    train_net.init_params(torch.Generator().manual_seed(3))
    inputs = {"data": torch.randn(4, 3, 32, 32, generator=generator), "label": torch.tensor([0.0, 1, 2, 1])}
    results = []
    for fuse in (True, False):
        train_net.fuse_layers = fuse
        for entry in train_net.learnable:
            entry.param.grad = None
        train_net.loss(train_net.forward(inputs)).backward()
        results.append([e.param.grad.clone() for e in train_net.learnable if e.param.grad is not None])
    assert len(results[0]) == len(results[1]) > 40
    for a, b in zip(*results):
        assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max()))
