"""pycaffe's solvers on the `lymph-cv train` engine, and a 2015-style Python training loop over the
tutorial net whose snapshot the rest of the toolchain loads (issue 19)."""
from __future__ import annotations

import numpy as np
import pytest

import lymph_cv.pycaffe as caffe
from lymph_cv.formats.caffe.blob import write_mean
from lymph_cv.formats.caffe.model import read_caffemodel
from lymph_cv.formats.inspect import describe
from lymph_cv.stages.train import test_model as caffe_test, train
from lymph_cv.workdir.layout import DB_TEST, DB_TRAIN, DEPLOY_NAME, MEAN_FILE
from netutil import rendered
from trainutil import class_images, make_dataset, make_fold, write_db

NET = """name: 'dummy' force_backward: true
layer { type: 'DummyData' name: 'data' top: 'data' top: 'label'
  dummy_data_param { shape { dim: 6 dim: 2 dim: 4 dim: 4 } shape { dim: 6 }
    data_filler { type: 'gaussian' std: 1 } data_filler { type: 'constant' } } }
layer { type: 'Convolution' name: 'conv' bottom: 'data' top: 'conv'
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: 'gaussian' std: 0.3 } } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'conv' top: 'ip'
  inner_product_param { num_output: 3 weight_filler { type: 'gaussian' std: 0.3 } } }
layer { type: 'SoftmaxWithLoss' name: 'loss' bottom: 'ip' bottom: 'label' top: 'loss' }
"""
SOLVER = """net: '{net}'
test_iter: 2 test_interval: 2 base_lr: 0.01 weight_decay: 0.0005 lr_policy: 'fixed'
display: 0 max_iter: 4 snapshot_after_train: false snapshot_prefix: "model" random_seed: 5 {extra}
"""


def _solver_file(tmp_path, extra="momentum: 0.9"):
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    solver = tmp_path / "solver.prototxt"
    solver.write_text(SOLVER.format(net=net, extra=extra))
    return str(solver)


def test_solver_attributes_step_update_snapshot_restore(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Caffe writes snapshot_prefix relative to the current directory
    solver = caffe.SGDSolver(_solver_file(tmp_path))
    net, (test_net,) = solver.net, solver.test_nets
    net.blobs["label"].data[...] = np.arange(6) % 3
    assert solver.iter == 0 and solver.type == "SGD" and solver.param.max_iter == 4
    weight = net.layers[2].blobs[0].data
    weight[...] = 0
    net.layers[2].blobs[0].diff[...] = 1
    solver.apply_update()
    assert solver.iter == 0 and np.allclose(weight, -0.01, atol=1e-7)  # base_lr 0.01, no history yet
    solver.step(2)
    assert solver.iter == 2 and np.isfinite(float(net.blobs["loss"].data))
    net.params["ip"][1].data[...] = 0.25
    np.testing.assert_array_equal(test_net.params["ip"][1].data, 0.25)  # the test net shares the weights
    solver.snapshot()
    assert (tmp_path / "model_iter_2.caffemodel").is_file() and (tmp_path / "model_iter_2.solverstate").is_file()
    assert not (tmp_path / "train.json").exists()
    solver.solve()
    assert solver.iter == 4
    again = caffe.get_solver(_solver_file(tmp_path))
    again.restore("model_iter_2.solverstate")
    assert again.iter == 2
    np.testing.assert_array_equal(again.net.params["ip"][1].data, 0.25)  # the weights of the snapshot
    kept = [p.data for ps in net.params.values() for p in ps] + [b.diff for b in test_net.blobs.values()]
    del solver, net, test_net
    assert all(np.isfinite(a.sum()) for a in kept)


@pytest.mark.parametrize("cls, name", [(caffe.NesterovSolver, "Nesterov"), (caffe.AdaGradSolver, "AdaGrad"),
                                       (caffe.RMSPropSolver, "RMSProp"), (caffe.AdaDeltaSolver, "AdaDelta"),
                                       (caffe.AdamSolver, "Adam")])
def test_each_solver_class_runs_its_own_type(tmp_path, cls, name):
    # AdaGrad takes no momentum (Caffe's check)
    path = _solver_file(tmp_path, "delta: 1e-6" if name == "AdaGrad" else "momentum: 0.9 delta: 1e-6")
    solver = cls(path)
    assert solver.type == name
    before = solver.net.params["conv"][0].data.copy()
    solver.step(1)
    assert not np.array_equal(before, solver.net.params["conv"][0].data)
    assert caffe.get_solver(path).type == "SGD"  # the file's own type


def test_pycaffe_solver_is_the_train_engine(tmp_path, monkeypatch):
    """Five iterations through caffe.get_solver end with the weights `lymph-cv train` writes."""
    make_dataset(tmp_path, n_train=48, n_test=16)
    solver_path = make_fold(tmp_path, batch=8, test_iter=2, max_iter=5, snapshot=0, display=0)
    result = train(solver_path, device="cpu", log_file=False)
    reference = read_caffemodel(result.snapshots[-1])
    monkeypatch.chdir(solver_path.parent)
    solver = caffe.get_solver(str(solver_path))
    solver.step(5)
    layers = {layer.name: layer for layer in reference.layer if len(layer.blobs)}
    for name, blobs in solver.net.params.items():
        for blob, proto in zip(blobs, layers[name].blobs):
            np.testing.assert_allclose(blob.data.ravel(), np.asarray(proto.data), rtol=1e-4, atol=1e-5)


def test_2015_python_loop_trains_the_tutorial_net_and_its_snapshot_loads_everywhere(tmp_path, monkeypatch, runner, cli):
    work = tmp_path / "work"
    fold = rendered(work, overrides={"batch_size": 16, "test_iter": 2, "max_iter": 40, "display": 0,
                                     "test_interval": 20, "snapshot": 0, "base_lr": 0.01, "random_seed": 3})
    train_images, train_labels = class_images(96, 0, size=36)
    test_images, test_labels = class_images(32, 1, size=36)
    write_db(work / DB_TRAIN.format(fold=1), train_images, train_labels)
    write_db(work / DB_TEST.format(fold=1), test_images, test_labels)
    write_mean(work / MEAN_FILE.format(fold=1), train_images.astype(np.float32).mean(axis=0))
    monkeypatch.chdir(fold.solver.parent)  # the tutorial: cd into the fold, run the script

    # the 2015 pycaffe idiom, as in Caffe's own examples
    caffe.set_mode_cpu()
    solver = caffe.SGDSolver(fold.solver.name)
    losses = []
    for _ in range(40):
        solver.step(1)
        losses.append(float(solver.net.blobs["loss"].data))
    solver.test_nets[0].forward()
    accuracy = float(solver.test_nets[0].blobs["accuracy"].data)
    solver.snapshot()
    assert np.all(np.isfinite(losses)) and np.mean(losses[-10:]) < np.mean(losses[:10])
    assert 0.0 <= accuracy <= 1.0
    model = fold.solver.parent / "1_caffenet_train_w32_iter_40.caffemodel"
    assert model.is_file()

    assert describe(model)["kind"] == "caffemodel"
    result = runner.invoke(cli, ["inspect", str(model)])
    assert result.exit_code == 0 and "conv1" in result.stdout
    tested = caffe_test(fold.net, [model], 2, device="cpu")  # `caffe test`
    assert np.isfinite(tested.loss)
    deploy = caffe.Net(DEPLOY_NAME, str(model), caffe.TEST)
    patches = np.random.default_rng(0).normal(0, 30, size=deploy.blobs["data"].shape)
    probs = deploy.forward(data=patches)["prob"]
    assert np.allclose(probs.reshape(len(probs), -1).sum(axis=1), 1, atol=1e-5)
    for name, blobs in solver.net.params.items():
        np.testing.assert_array_equal(deploy.params[name][0].data, blobs[0].data)
    from lymph_cv.stages.evaluate import WindowClassifier

    WindowClassifier(fold.deploy, model)  # evaluate's loader takes it too


PENALTY_LAYER = '''
import numpy as np


class Penalty:
    """loss = mean of squares of the bottom; counts its backward calls."""

    backward_calls = 0

    def __init__(self, param):
        pass

    def setup(self, bottom, top):
        self.scale = float(self.param_str)

    def reshape(self, bottom, top):
        top[0].reshape()

    def forward(self, bottom, top):
        top[0].data[()] = self.scale * np.mean(bottom[0].data ** 2)

    def backward(self, top, propagate_down, bottom):
        Penalty.backward_calls += 1
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * self.scale * 2 * bottom[0].data / bottom[0].count
'''


def test_a_python_layer_trains_in_lymph_cv_train(tmp_path, monkeypatch):
    (tmp_path / "penalty_layer.py").write_text(PENALTY_LAYER)
    monkeypatch.syspath_prepend(str(tmp_path))
    make_dataset(tmp_path, n_train=32, n_test=16)
    extra = ('layer { name: "penalty" type: "Python" bottom: "ip1" top: "penalty" loss_weight: 1\n'
             '  python_param { module: "penalty_layer" layer: "Penalty" param_str: "0.5" } }\n')
    solver_path = make_fold(tmp_path, batch=8, test_iter=1, max_iter=3, snapshot=0, display=1, net_extra=extra)
    result = train(solver_path, device="cpu", log_file=False)
    import penalty_layer

    assert result.iterations == 3 and np.isfinite(result.last_loss)
    assert penalty_layer.Penalty.backward_calls == 3 and "penalty" in result.test_scores


def test_solver_log_lines_on_stderr_unless_glog_quietens_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _solver_file(tmp_path)
    with open(path) as text:
        changed = text.read().replace("display: 0", "display: 1")
    with open(path, "w") as out:
        out.write(changed)
    solver = caffe.SGDSolver(path)
    solver.step(1)
    assert "Iteration 0, loss = " in capsys.readouterr().err
    monkeypatch.setenv("GLOG_minloglevel", "2")
    solver.step(1)
    assert "Iteration 1" not in capsys.readouterr().err
