"""SIGINT (Ctrl-C) during `slides tile` and `mil train`: exit 130 with one line, nothing under a final
name that is not whole, and a rerun that finishes (the tiler keeping the slides it completed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from lymph_cv.core.faults import FAULT_ENV


def interrupted(argv, event: str) -> subprocess.CompletedProcess:
    """``lymph-cv ARGV`` in a real process that sends itself SIGINT at the fault point ``event``."""
    env = {**os.environ, FAULT_ENV: f"int@{event}", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "lymph_cv", *argv], env=env, capture_output=True, text=True,
                          timeout=300)


def test_slides_tile_interrupted_exits_130_and_resumes(tmp_path, runner, cli):
    data, out = tmp_path / "data", tmp_path / "tiles"
    made = runner.invoke(cli, ["synth", str(data), "--layout", "slides", "--per-class", "1", "--cases-per-class", "1",
                               "--width", "1024", "--height", "1024", "--classes", "CLL,FL", "--workers", "1"])
    assert made.exit_code == 0, made.stderr
    args = ["slides", "tile", str(data), str(out), "--size", "64", "--mpp", "1", "--mask-side", "256",
            "--classes", "CLL,FL", "--workers", "1", "--no-qc"]
    done = interrupted(args, "tiles:slide#1")
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines()[-1] == "error: interrupted" and "Traceback" not in done.stderr
    assert not (out / "tiles.json").exists() and len(list((out / ".tiles").glob("*.json"))) == 1
    again = runner.invoke(cli, args)
    assert again.exit_code == 0, again.stderr
    assert (out / "tiles.json").is_file() and "2 slides" in again.stdout


def test_mil_train_interrupted_exits_130_and_a_rerun_completes(tmp_path, runner, cli):
    data, work = tmp_path / "data", tmp_path / "work"
    for args in (["synth", "--layout", "bags", str(data), "--patients", "4", "--cells", "2-3", "--cell-size", "24",
                  "--workers", "1"],
                 ["bags", "make", str(data), str(work)], ["bags", "split", str(work), "--k", "2"]):
        assert runner.invoke(cli, args).exit_code == 0, args
    args = ["mil", "train", str(work), "--crop", "24", "--epochs", "2", "--bags-per-batch", "1"]
    done = interrupted(args, "mil:batch#1")
    assert done.returncode == 130, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stopped by SIGINT" in errors[0] and "Traceback" not in done.stderr
    record = work / "mil" / "attention" / "1" / "mil.json"
    assert json.loads(record.read_text())["complete"] is False
    again = runner.invoke(cli, args)
    assert again.exit_code == 0, again.stderr
    assert all(json.loads((work / "mil" / "attention" / str(k) / "mil.json").read_text())["complete"]
               for k in (1, 2))
