"""``lymph-cv run``: end to end on a tiny synthetic set, skipping, partial reruns, interruptions."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lymph_cv.core.faults import FAULT_ENV
from lymph_cv.errors import ConfigError
from lymph_cv.pipeline import STAGES, DemoData, RunOptions, run_pipeline
from lymph_cv.formats.store import open_reader

TINY = DemoData(per_class=3, cases_per_class=3, width=168, height=136)
FOLDS = 3
MAX_ITER = 16
#: The stages of a run over images (synth only with --demo; tiles and slide_eval only over slides; bags and
#: mil only with --mil).
PIPELINE = [name for name in STAGES if name not in ("synth", "tiles", "slide_eval", "bags", "mil")]
#: Small batches keep each iteration cheap; two test batches per pass.
TRAIN_SET = {"batch_size": "32", "test_iter": "2"}
RUN_ARGS = ["--k", str(FOLDS), "--max-iter", str(MAX_ITER), "--workers", "1"] + [
    arg for key, value in TRAIN_SET.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny synthetic data set in the real layout, shared by the runs below."""
    from lymph_cv.stages.synth import generate

    data = tmp_path_factory.mktemp("data")
    generate(data, per_class=TINY.per_class, cases_per_class=TINY.cases_per_class, width=TINY.width,
             height=TINY.height, seed=0, workers=1)
    return data


def tiny_options(workdir: Path, data: Path, **changes) -> RunOptions:
    options = RunOptions(workdir=workdir, data=data, k=FOLDS, max_iter=MAX_ITER, overrides=dict(TRAIN_SET), workers=1)
    return dataclasses.replace(options, **changes)


def run_logged(options: RunOptions) -> dict:
    actions = {}
    result = run_pipeline(options, on_stage=lambda name, action: actions.__setitem__(name, action))
    assert result.report is not None
    return actions


def outputs_digest(workdir: Path) -> dict:
    """What a finished run produced: DB records, final snapshots, per-fold metrics."""
    digest = {}
    for fold in range(1, FOLDS + 1):
        for side in ("train", "test"):
            with open_reader(workdir / f"DB_{side}_{fold}") as db:
                digest[f"db_{side}_{fold}"] = hashlib.sha256(b"".join(k + v for k, v in db)).hexdigest()
        digest[f"mean_{fold}"] = hashlib.sha256((workdir / f"DB_train_w32_{fold}.binaryproto").read_bytes()).hexdigest()
        model = workdir / str(fold) / f"{fold}_caffenet_train_w32_iter_{MAX_ITER}.caffemodel"
        digest[f"model_{fold}"] = hashlib.sha256(model.read_bytes()).hexdigest()
        metrics = json.loads((workdir / "eval" / f"fold_{fold}" / "metrics.json").read_text())
        digest[f"confusion_{fold}"] = metrics["confusion"]
    return digest


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_data: Path) -> Path:
    """One uninterrupted tiny run, shared by the tests below."""
    workdir = tmp_path_factory.mktemp("run") / "work"
    actions = run_logged(tiny_options(workdir, tiny_data))
    assert actions == {name: "run" for name in PIPELINE}
    return workdir


def test_end_to_end_outputs(finished: Path):
    record = json.loads((finished / "run.json").read_text())
    assert all(record["stages"][name]["complete"] for name in PIPELINE)
    assert (finished / "eval" / "report.md").is_file()
    assert (finished / "eval" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((finished / "eval" / "report.json").read_text())
    assert sum(map(sum, report["confusion"])) == 3 * TINY.per_class
    assert record["stages"]["folds"]["params"]["seed"] == 0


def test_rerun_skips_every_stage(finished: Path, tiny_data: Path):
    assert run_logged(tiny_options(finished, tiny_data)) == {name: "skip" for name in PIPELINE}


def test_changed_parameter_reruns_from_its_stage(tmp_path: Path, finished: Path, tiny_data: Path):
    import shutil

    workdir = tmp_path / "work"
    shutil.copytree(finished, workdir)
    actions = run_logged(tiny_options(workdir, tiny_data, aggregate="mean"))
    assert [actions[s] for s in PIPELINE] == ["skip"] * 5 + ["run"] * 2
    actions = run_logged(tiny_options(workdir, tiny_data, aggregate="mean", backend="lmdb"))
    assert [actions[s] for s in PIPELINE] == ["skip"] * 2 + ["run"] * 5
    assert (workdir / "DB_train_1" / "data.mdb").is_file()
    actions = run_logged(tiny_options(workdir, tiny_data, aggregate="mean", backend="lmdb", from_stage="train"))
    assert [actions[s] for s in PIPELINE] == ["skip"] * 4 + ["run"] * 3


def test_display_interval_rerenders_and_trains_nothing_again(tmp_path: Path, finished: Path, tiny_data: Path):
    """A display interval cannot change a result: it stays out of the keys, the configs are rendered
    again with it, and nothing is trained or evaluated again."""
    import shutil

    from lymph_cv.formats.caffe.prototxt import read_solver

    workdir = tmp_path / "work"
    shutil.copytree(finished, workdir)
    model = workdir / "1" / f"1_caffenet_train_w32_iter_{MAX_ITER}.caffemodel"
    before = model.stat().st_mtime_ns
    actions = run_logged(tiny_options(workdir, tiny_data, overrides={**TRAIN_SET, "display": "3"}))
    # the stages after render resume (their inputs were rewritten) and find their work done
    assert [actions[s] for s in PIPELINE] == ["skip"] * 3 + ["resume"] * 4
    assert read_solver(workdir / "1" / "1-alexnet_solver_ada.prototxt").display == 3
    assert model.stat().st_mtime_ns == before
    assert (workdir / "eval" / "fold_1" / "metrics.json").stat().st_mtime_ns == \
        (finished / "eval" / "fold_1" / "metrics.json").stat().st_mtime_ns


def test_heatmaps_rerun_only_evaluation_and_report(tmp_path: Path, finished: Path, tiny_data: Path):
    import shutil

    workdir = tmp_path / "work"
    shutil.copytree(finished, workdir)
    assert (workdir / "eval" / "report.html").is_file()
    actions = run_logged(tiny_options(workdir, tiny_data, heatmaps=True))
    assert [actions[s] for s in PIPELINE] == ["skip"] * 5 + ["run"] * 2
    maps = sorted(p.name for p in (workdir / "eval" / "fold_1" / "heatmaps").iterdir())
    assert len(maps) == len((workdir / "test_w32_parent_1.txt").read_text().splitlines()) and maps[0].endswith(".png")
    assert run_logged(tiny_options(workdir, tiny_data, heatmaps=True)) == {name: "skip" for name in PIPELINE}


def test_bad_options_name_the_problem(tmp_path: Path):
    with pytest.raises(ConfigError, match="outside 1..3"):
        run_pipeline(tiny_options(tmp_path, tmp_path, folds=[4]))
    with pytest.raises(ConfigError, match="--seed: must be a non-negative integer"):
        run_pipeline(tiny_options(tmp_path, tmp_path, seed=-1))
    with pytest.raises(ConfigError, match="data folder not found"):
        run_pipeline(RunOptions(workdir=tmp_path, data=tmp_path / "missing"))


def test_cli_rejects_missing_data(runner, cli, tmp_path: Path):
    result = runner.invoke(cli, ["run", str(tmp_path / "w"), "--data", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "data folder not found" in result.stderr and "Traceback" not in result.stderr


def _run_until(workdir: Path, data: Path, event: str) -> None:
    """Run `lymph-cv run` in a subprocess that kills itself (SIGKILL) right after ``event`` (core.faults):
    deterministic, where polling for the moment had to land inside a ~0.1 s stage."""
    env = {**os.environ, FAULT_ENV: f"kill@{event}"}
    process = subprocess.run([sys.executable, "-m", "lymph_cv", "run", str(workdir), "--data", str(data), *RUN_ARGS],
                             stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env, timeout=600)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"


def _some_dbs_built(workdir: Path) -> bool:
    """At least one fold database finished, but not all of them."""
    built = [p for p in workdir.glob("DB_t*_[0-9]") if p.is_dir()]
    return 0 < len(built) < 2 * FOLDS


def _first_fold_snapshotted(workdir: Path) -> bool:
    return any((workdir / "1").glob("*_iter_*.solverstate")) and not (workdir / "1" / f"1_caffenet_train_w32_iter_{MAX_ITER}.solverstate").exists()


@pytest.mark.parametrize("event, ready", [("dbs:built#1", _some_dbs_built), ("train:snapshot#1", _first_fold_snapshotted)],
                         ids=["during-dbs", "during-training"])
def test_interrupted_run_completes_with_the_same_results(tmp_path: Path, finished: Path, tiny_data: Path, event, ready):
    workdir = tmp_path / "work"
    _run_until(workdir, tiny_data, event)
    assert ready(workdir), "killed at the wrong moment"
    record = json.loads((workdir / "run.json").read_text())
    assert not record["stages"].get("report", {}).get("complete")
    completed = subprocess.run([sys.executable, "-m", "lymph_cv", "run", str(workdir), "--data", str(tiny_data),
                                *RUN_ARGS], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "resuming" in completed.stderr
    assert not list(workdir.glob(".*.tmp-*")), "temporaries of the killed run were left behind"
    if event.startswith("dbs:"):
        # Killed while building databases: what that stage writes must be the same bytes; the
        # folds are then trained from scratch in another process, whose float32 arithmetic was seen
        # to drift by one unit in the loss's 6th digit in one of three full-suite runs (not
        # reproduced alone), so the trained weights are held to a tolerance there.
        data = {key: value for key, value in outputs_digest(workdir).items() if key.startswith(("db_", "mean_"))}
        assert data == {key: value for key, value in outputs_digest(finished).items() if key.startswith(("db_", "mean_"))}
        assert_same_weights(workdir, finished)
    else:
        assert outputs_digest(workdir) == outputs_digest(finished)


def assert_same_weights(workdir: Path, reference: Path, rtol: float = 1e-3, atol: float = 1e-4) -> None:
    """Every fold's final weights equal the reference run's within ``rtol``/``atol``."""
    import numpy as np

    from lymph_cv.formats.caffe.model import net_params, read_caffemodel

    for fold in range(1, FOLDS + 1):
        name = f"{fold}_caffenet_train_w32_iter_{MAX_ITER}.caffemodel"
        ours, theirs = (net_params(read_caffemodel(root / str(fold) / name)) for root in (workdir, reference))
        assert ours.keys() == theirs.keys()
        for layer, blobs in ours.items():
            for mine, reference_blob in zip(blobs, theirs[layer], strict=True):
                np.testing.assert_allclose(mine, reference_blob, rtol=rtol, atol=atol, err_msg=f"fold {fold} {layer}")


def test_cluster_executor_trains_folds_as_slurm_jobs(tmp_path: Path, tiny_data: Path, slurm_cluster):
    """`--executor slurm`: every fold is a real Slurm job; evaluation waits for them."""
    from lymph_cv.cluster import jobs

    workdir = tmp_path / "work"
    actions = run_logged(tiny_options(workdir, tiny_data, executor="slurm", job_timeout=300))
    assert actions == {name: "run" for name in PIPELINE}
    records = [r for r in jobs.load_jobs(workdir) if r.task == jobs.TRAIN_TASK]
    assert sorted(r.fold for r in records) == list(range(1, FOLDS + 1))
    assert {r.scheduler for r in records} == {"slurm"}
    assert all(s.state == jobs.COMPLETED for s in jobs.job_states(workdir))
    for fold in range(1, FOLDS + 1):
        assert (workdir / str(fold) / f"{fold}_caffenet_train_w32_iter_{MAX_ITER}.caffemodel").is_file()
    report = json.loads((workdir / "eval" / "report.json").read_text())
    assert sum(map(sum, report["confusion"])) == 3 * TINY.per_class


def test_resume_rebuilds_a_database_left_unrecorded(tmp_path: Path, finished: Path, tiny_data: Path):
    """A kill between a database's rename into place and its dbs.json record: the rerun rebuilds it
    (it used to stop with 'already exists; pass --overwrite')."""
    import shutil

    workdir = tmp_path / "work"
    shutil.copytree(finished, workdir)
    dbs_json = workdir / "dbs.json"
    dbs_record = json.loads(dbs_json.read_text())
    del dbs_record["dbs"]["DB_test_2"]
    dbs_json.write_text(json.dumps(dbs_record))
    run_json = workdir / "run.json"
    record = json.loads(run_json.read_text())
    for name in PIPELINE[PIPELINE.index("dbs"):]:
        record["stages"][name]["complete"] = False
    run_json.write_text(json.dumps(record))
    actions = run_logged(tiny_options(workdir, tiny_data))
    assert actions["dbs"] == "resume"
    assert "DB_test_2" in json.loads(dbs_json.read_text())["dbs"]
    assert outputs_digest(workdir) == outputs_digest(finished)


@pytest.mark.parametrize("change, option", [({"aggregate": "bogus"}, "--aggregate"), ({"device": "foo"}, "--device"),
                                            ({"device": "auto"}, "--device"),
                                            ({"overrides": {"foo": "1"}}, "--set")])
def test_bad_evaluation_or_device_options_fail_before_any_stage(tmp_path: Path, tiny_data: Path, change, option):
    """They used to fail only when training or evaluation first used them, after every stage before."""
    workdir = tmp_path / "work"
    with pytest.raises(ConfigError, match=f"^{option}: .*valid: "):
        run_pipeline(tiny_options(workdir, tiny_data, **change))
    assert not workdir.exists()


def test_report_pools_only_the_folds_of_this_run(tmp_path: Path, finished: Path, tiny_data: Path):
    """eval/fold_K left by other runs (another split, other folds) used to be pooled into run's report."""
    import shutil

    workdir = tmp_path / "work"
    shutil.copytree(finished, workdir)
    stale = workdir / "eval" / "fold_9"
    shutil.copytree(workdir / "eval" / "fold_1", stale)
    metrics = json.loads((stale / "metrics.json").read_text())
    (stale / "metrics.json").write_text(json.dumps({**metrics, "fold": 9}))
    result = run_pipeline(tiny_options(workdir, tiny_data, from_stage="report"))
    assert [f["fold"] for f in result.report.folds] == [1, 2, 3]
    assert json.loads((workdir / "eval" / "report.json").read_text())["folds"] == [1, 2, 3]
    assert sum(map(sum, result.report.confusion.tolist())) == 3 * TINY.per_class


def test_ctrl_c_is_one_error_line_and_status_130(runner, cli, tmp_path: Path, monkeypatch):
    """Click's own handling printed 'Aborted!' with status 1; the group's 'error: interrupted' was dead code."""
    import lymph_cv.pipeline as pipeline  # the command takes the engine from here when it runs

    def interrupted(options, on_stage=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_pipeline", interrupted)
    result = runner.invoke(cli, ["run", str(tmp_path / "w"), "--demo"])
    assert result.exit_code == 130 and result.stderr == "error: interrupted\n"


def test_adding_a_fold_keeps_the_folds_already_trained(tmp_path: Path, finished: Path, tiny_data: Path):
    """`--folds 1` then `--folds 1,2` used to rebuild and retrain fold 1 too (the fold list was in every key)."""
    import shutil

    workdir = tmp_path / "work"
    shutil.copytree(finished, workdir)
    run_json = workdir / "run.json"
    record = json.loads(run_json.read_text())
    for name in ("dbs", "render", "train", "evaluate"):  # as a run with --folds 1 leaves them
        record["stages"][name]["folds_started"] = [1]
    run_json.write_text(json.dumps(record))
    model_1 = workdir / "1" / f"1_caffenet_train_w32_iter_{MAX_ITER}.caffemodel"
    model_2 = workdir / "2" / f"2_caffenet_train_w32_iter_{MAX_ITER}.caffemodel"
    os.utime(model_1, ns=(0, 0))
    os.utime(model_2, ns=(0, 0))
    actions = run_logged(tiny_options(workdir, tiny_data, folds=[1, 2]))
    assert [actions[s] for s in PIPELINE] == ["skip"] * 2 + ["resume"] * 4 + ["run"]
    assert model_1.stat().st_mtime_ns == 0, "fold 1 was retrained"
    # fold 2 is new to this key, but its snapshots are of the same training (its train_key.json says
    # so): kept and taken as trained, never deleted and retrained
    assert model_2.stat().st_mtime_ns == 0, "fold 2's snapshots of the same training were retrained"
    assert model_2.read_bytes() == (finished / "2" / model_2.name).read_bytes()
    assert json.loads(run_json.read_text())["stages"]["train"]["folds_started"] == [1, 2]
    assert run_logged(tiny_options(workdir, tiny_data, folds=[1, 2])) == {name: "skip" for name in PIPELINE}


@pytest.mark.parametrize("text", ["[]", '{"stages": []}', '{"stages": {"patches": 5}}'])
def test_run_record_of_the_wrong_shape_is_one_error_line(runner, cli, tmp_path: Path, tiny_data: Path, text):
    """It used to end in an AttributeError traceback."""
    (tmp_path / "run.json").write_text(text)
    result = runner.invoke(cli, ["run", str(tmp_path), "--data", str(tiny_data)])
    assert result.exit_code == 2
    assert result.stderr == f"error: {tmp_path / 'run.json'}: not a lymph-cv run record (expected " \
                            '{"stages": {name: {...}}}); delete it to start over\n'


def test_dropout_variant_keeps_the_plain_snapshots(tmp_path: Path, finished: Path, tiny_data: Path):
    """Switching to --dropout used to delete the plain net's snapshots (every *_iter_N file of the
    fold) and evaluate whichever variant had the highest iteration."""
    import shutil

    workdir = tmp_path / "work"
    shutil.copytree(finished, workdir)
    plain = workdir / "1" / f"1_caffenet_train_w32_iter_{MAX_ITER}.caffemodel"
    before = plain.read_bytes()
    run_logged(tiny_options(workdir, tiny_data, dropout=True, folds=[1]))
    assert plain.read_bytes() == before
    dropout = workdir / "1" / f"1_caffenet_train_w32_dropout_iter_{MAX_ITER}.caffemodel"
    assert dropout.is_file()
    metrics = json.loads((workdir / "eval" / "fold_1" / "metrics.json").read_text())
    assert Path(metrics["settings"]["model"]).name == dropout.name
