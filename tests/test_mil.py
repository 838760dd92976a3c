"""MIL heads, the bag model, its storage, training and evaluation on tiny synthetic bags."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from lymph_cv.core.faults import FAULT_ENV
from lymph_cv.errors import ConfigError, FormatError
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.model import read_caffemodel
from lymph_cv.formats.caffe.prototxt import read_net_prototxt
from lymph_cv.net.build import build_net
from lymph_cv.net.mil import HeadConfig, KSpec, build_head, method_names, parse_k
from lymph_cv.net.mil.clinical import ClinicalMLP
from lymph_cv.net.mil.model import pad_bags
from lymph_cv.net.mil.registry import masked_softmax, topk_mean
from lymph_cv.net.mil.storage import load_modules, modules_netparam, write_modules
from lymph_cv.stages.mil.data import BagData
from lymph_cv.stages.mil.evaluate import PATIENTS_CSV, evaluate_bags, predict_bags
from lymph_cv.stages.mil.train import (ENCODER_DEPLOY, ENCODER_MODEL, HEAD_MODEL, MILConfig, load_model, save_model,
                                       train_mil)

CLASSES = ["reactive", "tumoral"]
SIZE = 12


def tiny_bags(count, seed, clinical=False):
    """Bags of flat grey cells; a tumoral bag has 30 % dark-centred cells (and a higher 'age')."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(count):
        label = i % 2
        n = int(rng.integers(6, 12))
        images = rng.integers(120, 136, (n, SIZE, SIZE, 3)).astype(np.uint8)
        if label:
            images[: max(1, int(0.3 * n)), 3:9, 3:9] = 20
        values = np.array([60 + 10 * label + rng.normal() * 5, rng.normal()], np.float32) if clinical else None
        bags.append(BagData(f"p{seed}_{i}", label, images, [f"c{j}.png" for j in range(n)], values))
    return bags


def test_registry_names_and_errors():
    assert set(method_names()) >= {"vote", "mean", "max", "topk", "learned", "attention"}
    with pytest.raises(ConfigError, match="attention"):
        build_head("nope", HeadConfig(4, 2))
    assert parse_k("25%,min=3") == KSpec(percent=25.0, minimum=3)
    assert parse_k("25%,min=3").resolve(4) == 3 and parse_k("25%").resolve(40) == 10 and parse_k("7").resolve(5) == 5
    for bad in ("0", "120%", "x", "5%,min=0"):
        with pytest.raises(ConfigError, match="--k"):
            parse_k(bad)


def test_masked_pooling_ignores_padding():
    values = torch.tensor([[[1.0], [5.0], [3.0], [99.0]], [[2.0], [4.0], [-1.0], [-2.0]]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    means, member = topk_mean(values, mask, KSpec(count=2))
    assert means.flatten().tolist() == [4.0, 3.0]
    assert member.tolist() == [[0, 1, 1, 0], [1, 1, 0, 0]]
    weights = masked_softmax(torch.randn(2, 4), mask)
    assert weights[0, 3] == 0 and torch.allclose(weights.sum(dim=1), torch.ones(2))


@pytest.mark.parametrize("method", ["vote", "mean", "max", "topk", "learned", "attention"])
def test_heads_pool_bags_of_different_sizes(method):
    torch.manual_seed(0)
    head = build_head(method, HeadConfig(features=6, classes=3, k_train=KSpec(count=2), k_agg=KSpec(percent=50)))
    features, mask = pad_bags([torch.randn(5, 6), torch.randn(2, 6)])
    classifier = torch.nn.Linear(6, 3)
    logits = classifier(features)
    out = head(features, logits, mask, classifier)
    assert out.logits.shape == (2, 3) and out.weights.shape == (2, 5)
    assert torch.all(out.weights[1, 2:] == 0)
    # padding never changes a bag's answer
    alone = head(features[1:, :2], logits[1:, :2], mask[1:, :2], classifier)
    assert torch.allclose(alone.logits, out.logits[1:], atol=1e-5)
    head.loss(out, logits, mask, torch.tensor([0, 2])).backward()


def test_head_storage_round_trip_and_errors(tmp_path):
    torch.manual_seed(1)
    modules = {"head": build_head("attention", HeadConfig(8, 2, attention_dim=4)), "clinical": ClinicalMLP(3, 2)}
    modules["clinical"].standardise.set([1, 2, 3], [0.5, 1, 2], [1, 2, 0])
    path = tmp_path / "mil_head.caffemodel"
    write_modules(path, modules)
    net = read_caffemodel(path)
    types = {layer.name: layer.type for layer in net.layer}
    assert types["head.attention_V"] == "InnerProduct" and types["clinical.standardise"] == "MILStandardise"
    assert types["head"] == "MILAttentionHead"
    torch.manual_seed(2)
    fresh = {"head": build_head("attention", HeadConfig(8, 2, attention_dim=4)), "clinical": ClinicalMLP(3, 2)}
    load_modules(path, fresh)
    for name in modules:
        for a, b in zip(modules[name].state_dict().values(), fresh[name].state_dict().values()):
            assert torch.equal(a, b)
    with pytest.raises(FormatError, match="attention_V.*shape|blob 0"):
        load_modules(path, {"head": build_head("attention", HeadConfig(9, 2, attention_dim=4))})
    assert len(modules_netparam({"head": build_head("vote", HeadConfig(8, 2))}).layer) == 1


def test_train_save_load_evaluate(tmp_path):
    config = MILConfig(method="attention", crop=SIZE, epochs=8, bags_per_batch=4, grad_instances=4,
                       fusion="concat", seed=3)
    train = tiny_bags(12, 0, clinical=True)
    trained = train_mil(train, CLASSES, config, ["age", "noise"])
    assert len(trained.history) == 8 and trained.history[-1]["loss"] < trained.history[0]["loss"]
    folder = save_model(trained, tmp_path / "model")
    loaded = load_model(folder)
    test = tiny_bags(6, 1, clinical=True)
    before = predict_bags(trained, test)
    after = predict_bags(loaded, test)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
    # the encoder is a caffemodel of its deploy net, as evaluate and pycaffe load them
    deploy = build_net(read_net_prototxt(folder / ENCODER_DEPLOY), caffe_pb2.TEST)
    assert "ip2" in deploy.load_weights(read_caffemodel(folder / ENCODER_MODEL))
    assert (folder / HEAD_MODEL).is_file()
    metrics = evaluate_bags(loaded, test, tmp_path / "eval")
    assert metrics["balanced_accuracy"] >= 0.8 and metrics["confusion_matrix"] and metrics["roc"]["auc"] is not None
    lines = (tmp_path / "eval" / PATIENTS_CSV).read_text().splitlines()
    assert lines[0].startswith("bag,label,decision,score") and len(lines) == 7
    assert len(list((tmp_path / "eval" / "montages").glob("*.png"))) == 6


def test_frozen_and_fusion_rules():
    bags = tiny_bags(6, 2)
    trained = train_mil(bags, CLASSES, MILConfig(method="topk", crop=SIZE, epochs=1, frozen=True, k_train="1"))
    encoder = trained.model.encoder
    assert not any(e.param.requires_grad for e in encoder.learnable if e.layer != "ip2")
    with pytest.raises(ConfigError, match="fusion"):
        train_mil(tiny_bags(4, 3, clinical=True), CLASSES, MILConfig(method="vote", crop=SIZE, fusion="sum"), ["a", "b"])
    with pytest.raises(ConfigError, match="--fusion"):
        train_mil(bags, CLASSES, MILConfig(crop=SIZE, fusion="late"))


def test_cli_train_evaluate_over_bag_splits(tmp_path, runner, cli):
    data, work = tmp_path / "data", tmp_path / "work"
    for args in (["synth", "--layout", "bags", str(data), "--patients", "8", "--cells", "4-7", "--cell-size", "24"],
                 ["bags", "make", str(data), str(work)], ["bags", "split", str(work), "--k", "2"]):
        assert runner.invoke(cli, args).exit_code == 0, args
    result = runner.invoke(cli, ["mil", "train", str(work), "--method", "topk", "--crop", "24", "--epochs", "2",
                                 "--k-train", "25%,min=2", "--fusion", "sum", "--seed", "4"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "split 2: balanced accuracy" in result.output and "2 split(s): balanced_accuracy" in result.output
    folder = work / "mil" / "topk+sum"
    record = json.loads((folder / "1" / "mil.json").read_text())
    assert record["complete"] and record["seed"] == 4 and record["clinical"] == ["age", "lymph_count", "gender"]
    pooled = json.loads((folder / "mil_metrics.json").read_text())
    assert pooled["folds"] == ["1", "2"] and sum(map(sum, pooled["confusion_matrix"])) == 8
    again = runner.invoke(cli, ["mil", "train", str(work), "--method", "topk", "--crop", "24", "--epochs", "2",
                                "--k-train", "25%,min=2", "--fusion", "sum", "--seed", "4"])
    assert again.exit_code == 0 and "split 1: balanced" not in again.output  # done splits are kept
    evaluated = runner.invoke(cli, ["mil", "evaluate", str(work), "--name", "topk+sum", "--json"])
    assert evaluated.exit_code == 0 and json.loads(evaluated.output)["folds"] == ["1", "2"]
    bad = runner.invoke(cli, ["mil", "train", str(work), "--method", "nope"])
    assert bad.exit_code == 2 and "unknown MIL method 'nope'" in bad.stderr and "attention" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_run_mil_attention_on_image_bags(tmp_path, runner, cli):
    """The tutorial's images as image bags through `run --mil attention --bag image`, end to end."""
    data, work = tmp_path / "data", tmp_path / "work"
    assert runner.invoke(cli, ["synth", str(data), "--per-class", "2", "--cases-per-class", "2", "--width", "110",
                               "--height", "80"]).exit_code == 0
    args = ["run", str(work), "--data", str(data), "--mil", "attention", "--bag", "image", "--k", "2",
            "--mil-set", "epochs=2", "--mil-set", "grad_instances=4"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output + result.stderr
    assert "MIL 2 split(s): balanced_accuracy" in result.output
    stages = json.loads((work / "run.json").read_text())["stages"]
    assert set(stages) == {"patches", "bags", "mil"} and all(s["complete"] for s in stages.values())
    fold = work / "mil" / "attention" / "1"
    assert (fold / "encoder.caffemodel").is_file() and list((fold / "heatmaps").glob("*.png"))
    rows = (fold / "patients.csv").read_text().splitlines()
    assert len(rows) == 4 and "@" in rows[1]  # 3 test images; instances named by their window
    again = runner.invoke(cli, args)
    assert again.exit_code == 0 and "== mil: up to date, skipped" in again.stderr
    bad = runner.invoke(cli, ["run", str(work), "--data", str(data), "--bag", "image"])
    assert bad.exit_code == 2 and "--bag needs --mil METHOD" in bad.stderr
    jobs = runner.invoke(cli, args + ["--executor", "slurm"])
    assert jobs.exit_code == 2 and "MIL splits train in this process" in jobs.stderr


def test_mil_train_stopped_by_sigterm_saves_exits_143_and_a_rerun_goes_on_to_the_same_weights(tmp_path, runner, cli):
    data, work = tmp_path / "data", tmp_path / "work"
    for args in (["synth", "--layout", "bags", str(data), "--patients", "4", "--cells", "3-4", "--cell-size", "24"],
                 ["bags", "make", str(data), str(work)], ["bags", "split", str(work), "--k", "2"]):
        assert runner.invoke(cli, args).exit_code == 0, args
    whole = tmp_path / "whole"
    shutil.copytree(work, whole)
    train = ["--crop", "24", "--epochs", "3", "--bags-per-batch", "1"]
    assert runner.invoke(cli, ["mil", "train", str(whole), *train]).exit_code == 0
    # 2 training bags a split, so 2 batches an epoch: the 3rd batch is epoch 2's first
    env = {**os.environ, FAULT_ENV: "term@mil:batch#3", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "lymph_cv", "mil", "train", str(work), *train], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr
    assert "stopped by SIGTERM in epoch 2 of 3 (after batch 1 of 2)" in done.stderr and "Traceback" not in done.stderr
    folder = work / "mil" / "attention" / "1"
    record = json.loads((folder / "mil.json").read_text())
    assert record["complete"] is False and len(record["history"]) == 1 and (folder / "resume.solverstate").is_file()
    assert record["resume"]["epoch"] == 1 and record["resume"]["next_batch"] == 1
    # a resume record that does not fit: one line naming the file, and nothing trained over it
    broken = {**record, "resume": {k: v for k, v in record["resume"].items() if k != "generator"}}
    (folder / "mil.json").write_text(json.dumps(broken))
    refused = runner.invoke(cli, ["mil", "train", str(work), *train])
    assert refused.exit_code == 2 and "mil.json" in refused.stderr and "resume record" in refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    (folder / "mil.json").write_text(json.dumps(record))
    again = runner.invoke(cli, ["mil", "train", str(work), *train])
    assert again.exit_code == 0, again.stderr
    # went on, not again from the start: the stopped run's first epoch is kept as it was timed
    assert json.loads((folder / "mil.json").read_text())["history"][0] == record["history"][0]
    for split in ("1", "2"):
        ours, theirs = work / "mil" / "attention" / split, whole / "mil" / "attention" / split
        for name in ("encoder.caffemodel", "mil_head.caffemodel"):
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), (split, name)
        ours_record, theirs_record = (json.loads((f / "mil.json").read_text()) for f in (ours, theirs))
        assert ours_record["complete"] and "resume" not in ours_record
        assert [h["loss"] for h in ours_record["history"]] == [h["loss"] for h in theirs_record["history"]]