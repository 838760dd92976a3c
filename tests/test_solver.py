"""Caffe's solver updates and learning-rate policies, checked against hand computations in numpy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.errors import ConfigError, FormatError, TrainingError
from lymph_cv.net.solver import LR_POLICIES, LearningRate, Learnable, make_solver, solver_type

N, K, C = 6, 4, 3  # samples, inputs, classes of the tiny softmax net


def solver_param(**fields) -> caffe_pb2.SolverParameter:
    param = caffe_pb2.SolverParameter(lr_policy="fixed", base_lr=0.01)
    for key, value in fields.items():
        if isinstance(value, list):
            getattr(param, key).extend(value)
        elif hasattr(value, "DESCRIPTOR"):  # a sub-message (onecycle_param)
            getattr(param, key).CopyFrom(value)
        else:
            setattr(param, key, value)
    return param


def tiny_problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, K)).astype(np.float32)
    labels = rng.integers(0, C, size=N)
    weight = rng.normal(scale=0.5, size=(C, K)).astype(np.float32)
    bias = rng.normal(scale=0.1, size=C).astype(np.float32)
    return x, labels, weight, bias


def numpy_gradients(x, labels, weight, bias):
    """d(mean softmax loss)/d(W, b) of logits = x·Wᵀ + b, in float64."""
    logits = x.astype(np.float64) @ weight.T.astype(np.float64) + bias
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(N), labels] -= 1.0
    p /= N
    return p.T @ x, p.sum(axis=0)


def torch_step(solver_fields, x, labels, weight, bias, lr_mults=(1.0, 2.0), decay_mults=(1.0, 0.5),
               steps=1):
    w = torch.tensor(weight, requires_grad=True)
    b = torch.tensor(bias, requires_grad=True)
    learnables = [Learnable(w, lr_mults[0], decay_mults[0]), Learnable(b, lr_mults[1], decay_mults[1])]
    solver = make_solver(solver_param(**solver_fields), learnables)
    for _ in range(steps):
        solver.zero_grad()
        logits = torch.from_numpy(x) @ w.T + b
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
        solver.apply_update()
    return w.detach().numpy(), b.detach().numpy(), solver


def test_sgd_two_steps_match_hand_computation():
    x, labels, weight, bias = tiny_problem()
    lr, momentum, decay = 0.05, 0.9, 0.004
    got_w, got_b, solver = torch_step(dict(base_lr=lr, momentum=momentum, weight_decay=decay, type="SGD"),
                                      x, labels, weight, bias, steps=2)
    w, b = weight.astype(np.float64), bias.astype(np.float64)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for _ in range(2):
        gw, gb = numpy_gradients(x, labels, w, b)
        gw = gw + decay * 1.0 * w        # decay_mult 1 for the weights
        gb = gb + decay * 0.5 * b        # decay_mult 0.5 for the bias
        vw = momentum * vw + lr * 1.0 * gw
        vb = momentum * vb + lr * 2.0 * gb  # lr_mult 2 for the bias
        w, b = w - vw, b - vb
    np.testing.assert_allclose(got_w, w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_b, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(solver.history_arrays()[0], vw, rtol=1e-5, atol=1e-8)
    assert solver.iter == 2


def test_adagrad_two_steps_match_hand_computation():
    x, labels, weight, bias = tiny_problem(1)
    lr, decay, delta = 0.01, 0.004, 1e-8
    param = dict(base_lr=lr, weight_decay=decay, solver_type=caffe_pb2.SolverParameter.ADAGRAD)
    got_w, got_b, solver = torch_step(param, x, labels, weight, bias, steps=2)
    w, b = weight.astype(np.float64), bias.astype(np.float64)
    hw, hb = np.zeros_like(w), np.zeros_like(b)
    for _ in range(2):
        gw, gb = numpy_gradients(x, labels, w, b)
        gw, gb = gw + decay * w, gb + decay * 0.5 * b
        hw, hb = hw + gw ** 2, hb + gb ** 2
        w = w - lr * 1.0 * gw / (np.sqrt(hw) + delta)
        b = b - lr * 2.0 * gb / (np.sqrt(hb) + delta)
    np.testing.assert_allclose(got_w, w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_b, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(solver.history_arrays()[1], hb, rtol=1e-5, atol=1e-10)
    assert type(solver).__name__ == "AdaGradSolver"


def test_l1_clipping_and_iter_size():
    x, labels, weight, bias = tiny_problem(2)
    lr, decay, clip = 0.1, 0.01, 0.05
    fields = dict(base_lr=lr, weight_decay=decay, regularization_type="L1", clip_gradients=clip, iter_size=2)
    # iter_size 2 with one backward per "iteration" in torch_step: the diff is halved by Normalize.
    got_w, _, _ = torch_step(fields, x, labels, weight, bias, lr_mults=(1, 1), decay_mults=(1, 1))
    gw, gb = numpy_gradients(x, labels, weight, bias)
    norm = math.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    scale = clip / norm if norm > clip else 1.0
    expected = weight - lr * (gw * scale / 2 + decay * np.sign(weight))
    np.testing.assert_allclose(got_w, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["Nesterov", "RMSProp", "AdaDelta", "Adam"])
def test_other_solvers_step_and_history_layout(kind):
    x, labels, weight, bias = tiny_problem(3)
    fields = dict(type=kind, base_lr=0.01, momentum=0.9 if kind != "RMSProp" else 0.0)
    got_w, _, solver = torch_step(fields, x, labels, weight, bias)
    gw, _ = numpy_gradients(x, labels, weight, bias)
    if kind == "Nesterov":
        expected = weight - 1.9 * 0.01 * gw
    elif kind == "RMSProp":
        h = 0.01 * gw ** 2
        expected = weight - 0.01 * gw / (np.sqrt(h) + 1e-8)
    elif kind == "AdaDelta":
        h = 0.1 * gw ** 2
        expected = weight - 0.01 * gw * np.sqrt(1e-8 / (h + 1e-8))
    else:
        m, v = 0.1 * gw, 0.001 * gw ** 2
        correction = math.sqrt(1 - 0.999) / (1 - 0.9)
        expected = weight - 0.01 * correction * m / (np.sqrt(v) + 1e-8)
    np.testing.assert_allclose(got_w, expected, rtol=1e-4, atol=1e-7)
    assert len(solver.history_arrays()) == (4 if kind in ("AdaDelta", "Adam") else 2)


def test_restore_checks_history_count():
    _, _, solver = torch_step(dict(type="SGD"), *tiny_problem())
    with pytest.raises(TrainingError, match="history blobs"):
        solver.restore(5, 0, [np.zeros((C, K), np.float32)])
    solver.restore(7, 2, [np.ones((C, K), np.float32), -np.ones(C, np.float32)])  # SGD: any sign
    assert solver.iter == 7 and solver.current_step == 2
    _, _, adagrad = torch_step(dict(type="AdaGrad"), *tiny_problem())
    with pytest.raises(TrainingError, match="blob 1 has negative values"):
        adagrad.restore(7, 0, [np.ones((C, K), np.float32), -np.ones(C, np.float32)])


def rates(policy, iterations, **fields):
    schedule = LearningRate(solver_param(lr_policy=policy, base_lr=0.1, **fields))
    return [schedule(i) for i in iterations], schedule


def test_lr_policies():
    got, schedule = rates("step", [0, 9, 10, 25], gamma=0.5, stepsize=10)
    assert got == pytest.approx([0.1, 0.1, 0.05, 0.025]) and schedule.current_step == 2
    got, _ = rates("exp", [0, 2], gamma=0.9)
    assert got == pytest.approx([0.1, 0.1 * 0.81])
    got, _ = rates("inv", [0, 10], gamma=0.1, power=0.75)
    assert got == pytest.approx([0.1, 0.1 * 2 ** -0.75])
    got, _ = rates("poly", [0, 50], power=2.0, max_iter=100)
    assert got == pytest.approx([0.1, 0.025])
    got, _ = rates("sigmoid", [100], gamma=0.1, stepsize=100)
    assert got == pytest.approx([0.05])
    got, _ = rates("fixed", [0, 10 ** 6])
    assert got == pytest.approx([0.1, 0.1])


def test_multistep_advances_one_step_per_call():
    # Caffe advances at most one step per call: iteration 30 after 0 leaves the second step for later.
    got, schedule = rates("multistep", [0, 30, 31, 40], gamma=0.1, stepvalue=[10, 20, 40])
    assert got == pytest.approx([0.1, 0.01, 0.001, 0.0001])
    assert schedule.current_step == 3
    assert set(LR_POLICIES) == {"fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid", "onecycle"}


def test_config_errors_name_valid_values():
    with pytest.raises(ConfigError, match="valid: fixed, step"):
        LearningRate(solver_param(lr_policy="cosine"))
    with pytest.raises(ConfigError, match="valid: SGD, Nesterov"):
        make_solver(solver_param(type="LBFGS"), [])
    with pytest.raises(ConfigError, match="momentum must be 0"):
        make_solver(solver_param(type="AdaGrad", momentum=0.9), [])
    with pytest.raises(FormatError, match="both 'solver_type' and 'type'"):
        solver_type(solver_param(type="SGD", solver_type=caffe_pb2.SolverParameter.ADAM))


TINY_NET = """name: "tiny"
input: "data" input_dim: %d input_dim: %d input_dim: 1 input_dim: 1
input: "label" input_dim: %d input_dim: 1 input_dim: 1 input_dim: 1
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: %d weight_filler { type: "gaussian" std: 0.5 }
    bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
""" % (N, K, N, C)


@pytest.mark.parametrize("kind", ["SGD", "AdaGrad"])
def test_step_on_a_built_net_uses_its_param_specs(kind):
    from lymph_cv.formats.caffe.prototxt import parse_net_text
    from lymph_cv.net.build import build_net
    from lymph_cv.net.solver import learnables_of

    net = build_net(parse_net_text(TINY_NET), caffe_pb2.TRAIN)
    net.init_params(torch.Generator().manual_seed(0))
    x, labels, _, _ = tiny_problem(4)
    weight = net.learnable[0].param.detach().numpy().reshape(C, K).astype(np.float64)
    bias = net.learnable[1].param.detach().numpy().astype(np.float64)
    lr, decay, momentum = 0.1, 0.01, (0.9 if kind == "SGD" else 0.0)
    solver = make_solver(solver_param(type=kind, base_lr=lr, weight_decay=decay, momentum=momentum),
                         learnables_of(net))
    inputs = {"data": torch.from_numpy(x.reshape(N, K, 1, 1)), "label": torch.from_numpy(labels.astype(np.float32))}
    net.loss(net(inputs)).backward()
    solver.apply_update()
    gw, gb = numpy_gradients(x, labels, weight, bias)
    gw = gw + decay * weight          # decay_mult 1; the bias has decay_mult 0
    if kind == "SGD":
        expected_w, expected_b = weight - lr * gw, bias - 2 * lr * gb
    else:
        expected_w = weight - lr * gw / (np.abs(gw) + 1e-8)
        expected_b = bias - 2 * lr * gb / (np.abs(gb) + 1e-8)
    np.testing.assert_allclose(net.learnable[0].param.detach().numpy().reshape(C, K), expected_w, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(net.learnable[1].param.detach().numpy(), expected_b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- one-cycle and AdamW
def onecycle_param(**fields) -> caffe_pb2.SolverParameter:
    return solver_param(lr_policy="onecycle", base_lr=0.1, max_iter=8, **fields)


def test_onecycle_rates_and_momenta_match_hand_computed_schedule():
    from lymph_cv.net.solver import one_cycle

    # max_iter 8, warm-up 0.25 = 2 iterations: start 0.1/25, peak 0.1 at 2, end 0.1/1e5;
    # a half cosine is halfway at its midpoint (iteration 1 going up, 5 coming down).
    expected = {0: (0.004, 0.95), 1: (0.052, 0.90), 2: (0.1, 0.85), 5: (0.0500005, 0.90), 8: (1e-6, 0.95)}
    param = onecycle_param()
    for iteration, (rate, momentum) in expected.items():
        assert one_cycle(iteration, param) == pytest.approx((rate, momentum), rel=1e-6), iteration
    # iteration 3 of 8: 1/6 into the descent, rate = 1e-6 + (0.1 - 1e-6)·(1 + cos(π/6))/2
    rate, momentum = one_cycle(3, param)
    assert rate == pytest.approx(1e-6 + (0.1 - 1e-6) * (1 + math.cos(math.pi / 6)) / 2, rel=1e-6)
    assert momentum == pytest.approx(0.95 - 0.10 * (1 + math.cos(math.pi / 6)) / 2, rel=1e-6)
    got, _ = rates("onecycle", [0, 2, 8], max_iter=8)
    assert got == pytest.approx([0.004, 0.1, 1e-6])
    custom = onecycle_param(onecycle_param=caffe_pb2.OneCycleParameter(pct_start=0.5, div=10, div_final=100))
    assert one_cycle(0, custom)[0] == pytest.approx(0.01) and one_cycle(4, custom)[0] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="onecycle needs max_iter > 0"):
        LearningRate(solver_param(lr_policy="onecycle"))
    with pytest.raises(ConfigError, match="pct_start must be in"):
        LearningRate(onecycle_param(onecycle_param=caffe_pb2.OneCycleParameter(pct_start=1.0)))


def test_onecycle_cycles_sgd_momentum_in_the_update():
    x, labels, weight, bias = tiny_problem(5)
    fields = dict(lr_policy="onecycle", base_lr=0.1, max_iter=8, momentum=0.5, type="SGD")
    got_w, _, solver = torch_step(fields, x, labels, weight, bias, decay_mults=(0, 0), steps=2)
    w, b = weight.astype(np.float64), bias.astype(np.float64)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for rate, momentum in ((0.004, 0.95), (0.052, 0.90)):  # the schedule above, not momentum 0.5
        gw, gb = numpy_gradients(x, labels, w, b)
        vw, vb = momentum * vw + rate * gw, momentum * vb + 2 * rate * gb
        w, b = w - vw, b - vb
    np.testing.assert_allclose(got_w, w, rtol=1e-5, atol=1e-7)
    assert solver.momentum == pytest.approx(0.90)


def test_adamw_decays_weights_decoupled_and_not_the_bias():
    x, labels, weight, bias = tiny_problem(6)
    lr, decay, beta1, beta2, delta = 0.01, 0.1, 0.9, 0.999, 1e-8
    w_t = torch.tensor(weight, requires_grad=True)
    b_t = torch.tensor(bias, requires_grad=True)
    learnables = [Learnable(w_t, 1.0, 1.0, "ip[0]"), Learnable(b_t, 2.0, 1.0, "ip[1]", decoupled_decay=False)]
    solver = make_solver(solver_param(type="AdamW", base_lr=lr, weight_decay=decay, momentum=beta1), learnables)
    w, b = weight.astype(np.float64), bias.astype(np.float64)
    mw, vw, mb, vb = (np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b))
    for t in (1, 2):
        solver.zero_grad()
        logits = torch.from_numpy(x) @ w_t.T + b_t
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
        solver.apply_update()
        gw, gb = numpy_gradients(x, labels, w, b)  # no decay in the gradient
        correction = math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        mw, vw = beta1 * mw + (1 - beta1) * gw, beta2 * vw + (1 - beta2) * gw ** 2
        mb, vb = beta1 * mb + (1 - beta1) * gb, beta2 * vb + (1 - beta2) * gb ** 2
        w = w - lr * (correction * mw / (np.sqrt(vw) + delta) + decay * w)
        b = b - 2 * lr * correction * mb / (np.sqrt(vb) + delta)
    np.testing.assert_allclose(w_t.detach().numpy(), w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b_t.detach().numpy(), b, rtol=1e-5, atol=1e-7)
    assert len(solver.history_arrays()) == 4  # Adam's m and v: a solverstate like Adam's


def test_adamw_skips_bias_batchnorm_and_scale_blobs_of_a_net():
    from lymph_cv.net.solver import decays_decoupled
    from lymph_cv.formats.caffe.prototxt import parse_net_text
    from lymph_cv.net.build import build_net
    from lymph_cv.net.solver import learnables_of

    assert decays_decoupled("Convolution", 0) and decays_decoupled("InnerProduct", 0)
    assert not decays_decoupled("Convolution", 1) and not decays_decoupled("InnerProduct", 1)
    assert not any(decays_decoupled(kind, 0) for kind in ("BatchNorm", "Scale", "Bias"))
    net = build_net(parse_net_text(TINY_NET), caffe_pb2.TRAIN)
    assert [item.decoupled_decay for item in learnables_of(net)] == [True, False]
