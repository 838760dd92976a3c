"""CLI conventions: every usage error is one line `error: <option or file>: <what was expected>`
with exit status 2, --version, one type per option meaning (--device, --workers)."""
from __future__ import annotations

import pytest

from lymph_cv import __version__


def _error(runner, cli, args) -> str:
    result = runner.invoke(cli, args)
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Usage:" not in result.stderr and "Traceback" not in result.stderr
    return lines[0]


def test_usage_errors_are_one_line(tmp_path, runner, cli):
    log = tmp_path / "train.log"
    log.write_text("x\n")
    assert _error(runner, cli, ["plot-log", str(log), "-o", "c.png", "--bogus"]) == "error: --bogus: no such option"
    assert _error(runner, cli, ["plot-log", str(log), "--chart", "9", "-o", "c.png"]).startswith(
        "error: --chart: unknown chart '9' (valid: 0=test-accuracy-iterations")
    assert _error(runner, cli, ["plot-log", str(log)]) == "error: --output: required option, not given"
    assert _error(runner, cli, ["export"]) == "error: MODEL: required argument, not given"
    missing = tmp_path / "nope.caffemodel"
    assert _error(runner, cli, ["export", str(missing), str(log), "-o", "m.onnx"]) == f"error: {missing}: does not exist (MODEL)"
    assert _error(runner, cli, ["folds", "check", str(tmp_path), "--strict", "--strikt"]).startswith("error: --strikt: no such option")
    assert _error(runner, cli, ["bogus"]).startswith("error: No such command 'bogus' (see '")  # '<prog> --help')
    assert _error(runner, cli, ["--bogus"]).startswith("error: --bogus: no such option")
    assert _error(runner, cli, ["render", str(tmp_path), "--folds", "x"]).startswith("error: --folds: ")
    # A group without a subcommand still shows its help.
    assert "Commands:" in runner.invoke(cli, ["folds"]).stdout + runner.invoke(cli, ["folds"]).stderr


def test_version_and_folds_help(runner, cli):
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"lymph-cv, version {__version__}"
    folds = runner.invoke(cli, ["folds", "--help"])
    assert folds.exit_code == 0 and "make" in folds.stdout and "check" in folds.stdout


DEVICE_COMMANDS = [["run", "W", "--demo"], ["evaluate", "W", "--fold", "1"], ["train", "--solver", "S"], ["render", "W"],
                   ["heldout", "W"]]


@pytest.mark.parametrize("command", DEVICE_COMMANDS, ids=lambda c: c[0])
def test_device_is_one_checked_type_everywhere(runner, cli, command):
    line = _error(runner, cli, [command[0], "--device", "tpu", *command[1:]])  # parsed before the paths
    assert line == "error: --device: expected one of cpu, cuda, auto, cuda:N, got 'tpu'"
    help_text = runner.invoke(cli, [command[0], "--help"]).stdout
    assert "[cpu|cuda|auto|cuda:N]" in help_text


def test_slides_evaluate_device_is_the_checked_type(runner, cli):
    """It took any text, and a bad one failed only after the tile manifest was read."""
    line = _error(runner, cli, ["slides", "evaluate", "W", "-k", "1", "--device", "tpu"])
    assert line == "error: --device: expected one of cpu, cuda, auto, cuda:N, got 'tpu'"


def test_train_procs_is_bounded_by_the_cores(runner, cli, tmp_path):
    """--procs 100000 forked until the machine ran out of memory."""
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "net.prototxt"\n')
    assert _error(runner, cli, ["train", "--solver", str(solver), "--procs", "100000"]).startswith(
        "error: --procs: 100000 processes on ")


@pytest.mark.parametrize("command", [["run", "W", "--demo"], ["patches", "D", "O"], ["submit", "W"], ["dbs", "W"]],
                         ids=lambda c: c[0])
def test_workers_is_zero_or_more_everywhere(runner, cli, command):
    assert _error(runner, cli, [command[0], "--workers", "-1", *command[1:]]).startswith("error: --workers: -1 is not in the range x>=0")
