"""``lymph-cv submit`` / ``lymph-cv jobs`` against a real one-node Slurm cluster with Torque wrappers."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from cluster import ClusterError, SlurmCluster
from lymph_cv import jobs
from lymph_cv.errors import ConfigError, SchedulerError

FOLDS = 5
#: Seconds a test waits for its jobs: a tiny fold trains in a few seconds.
JOB_TIMEOUT_S = 150
POLL_S = 0.5


# -- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node Slurm cluster; ``SLURM_CONF`` points the client commands at it."""
    cluster = SlurmCluster()
    try:
        cluster.start()
    except ClusterError as exc:
        pytest.fail(f"the Slurm test cluster did not start: {exc}")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in cluster.env.items():
            patch.setenv(name, value)
        yield cluster
    cluster.stop()


@pytest.fixture
def configured(tmp_path: Path) -> Path:
    """A work directory whose folds have lists and a solver file (for submission mechanics)."""
    workdir = tmp_path / "work"
    for fold in range(1, FOLDS + 1):
        (workdir / str(fold)).mkdir(parents=True)
        (workdir / f"test_w32_{fold}.txt").write_text("")
        jobs.solver_path(workdir, fold).write_text('net: "net.prototxt"\n')
    return workdir


def _fake_command(folder: Path, name: str, body: str) -> Path:
    """An executable ``name`` in ``folder`` running the bash ``body``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _recorded(workdir: Path) -> dict:
    return {record.fold: record for record in jobs.load_jobs(workdir)}


# -- scripts and dry runs -----------------------------------------------------------------
@pytest.mark.parametrize("scheduler", jobs.SCHEDULERS)
def test_dry_run_writes_scripts_and_submits_nothing(configured, runner, cli, scheduler):
    result = runner.invoke(cli, ["submit", str(configured), "--scheduler", scheduler, "--dry-run",
                                 "--walltime", "01:00:00", "--queue", "batch"])
    assert result.exit_code == 0, result.stderr
    assert not (configured / jobs.JOBS_FILE).exists()
    lines = result.stdout.strip().splitlines()
    assert len(lines) == FOLDS
    for fold, line in enumerate(lines, start=1):
        script = configured / str(fold) / f"{fold}_train{jobs.SCRIPT_SUFFIX[scheduler]}"
        assert script.is_file() and os.access(script, os.X_OK)
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        text = script.read_text()
        assert f"--solver {fold}-alexnet_solver_ada.prototxt" in text
        assert jobs.SUBMIT_COMMAND[scheduler] in line


def test_pbs_script_has_the_tutorial_directives(configured):
    spec = jobs.train_spec(configured, 2, "pbs")
    options = jobs.JobOptions(walltime="320:00:00", queue="gpufermi", gpus=1, mail="me@example.org")
    text = jobs.render_script(spec, "pbs", options)
    for directive in ("#PBS -l walltime=320:00:00", "#PBS -l nodes=1:ppn=1:gpus=1:exclusive_process",
                      "#PBS -q gpufermi", "#PBS -N 2_TASK", "#PBS -M me@example.org", "#PBS -m bea",
                      "#PBS -o 2_TASK_output.out", "#PBS -j oe"):
        assert directive in text.splitlines()
    command = jobs.submit_command(spec, "pbs", jobs.JobOptions(after=("7", "8")))
    assert command[:3] == ["qsub", "-N", "2_TASK"]
    assert ["-o", "2_TASK_output.out", "-j", "oe"] == command[3:7]
    assert "depend=afterok:7:8" in command and command[-1] == "2_train.pbs"
    plain = jobs.render_script(spec, "pbs", jobs.JobOptions())
    assert "#PBS -M" not in plain and "#PBS -m" not in plain and "#PBS -q" not in plain and "gpus" not in plain


def test_slurm_script_has_its_directives(configured):
    spec = jobs.train_spec(configured, 3, "slurm")
    text = jobs.render_script(spec, "slurm", jobs.JobOptions(walltime="2:00:00", queue="gpu", gpus=2, ppn=4))
    for directive in ("#SBATCH --job-name=3_TASK", "#SBATCH --time=2:00:00", "#SBATCH --cpus-per-task=4",
                      "#SBATCH --gres=gpu:2", "#SBATCH --partition=gpu", "#SBATCH --output=3_TASK_output.out"):
        assert directive in text.splitlines()
    assert "export OMP_NUM_THREADS=4" in text
    command = jobs.submit_command(spec, "slurm", jobs.JobOptions(after=("9",)))
    assert "--dependency=afterok:9" in command and command[-1] == str(spec.script)


def test_evaluation_job_depends_on_the_training_jobs(configured):
    submission = jobs.submit_evaluation(configured, "slurm", after=["11", "12"], args=["--oversample"], dry_run=True)
    assert "--dependency=afterok:11:12" in submission.command
    text = submission.script.read_text()
    assert f"-m lymph_cv evaluate {configured.resolve()} --oversample" in text


@pytest.mark.parametrize("option, value", [("--walltime", "1h; touch x"), ("--queue", "q$(id)"),
                                           ("--mail", "a b@c"), ("--after", "1;2")])
def test_unsafe_option_values_are_refused(configured, runner, cli, option, value):
    result = runner.invoke(cli, ["submit", str(configured), "--scheduler", "pbs", "--dry-run", option, value])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {option} ")
    assert not list(configured.glob("*/*.pbs"))


# -- submission errors --------------------------------------------------------------------
def test_missing_scheduler_command_is_one_line(configured, runner, cli, monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = runner.invoke(cli, ["submit", str(configured), "--scheduler", "slurm"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: sbatch: command not found on PATH "
                                                  "(is this a sbatch submit host?)"]
    assert not (configured / jobs.JOBS_FILE).exists()


def test_failing_qsub_keeps_the_jobs_already_submitted(configured, runner, cli, monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    # Accepts two jobs, then refuses like a Torque server with a full queue.
    _fake_command(bin_dir, "qsub", f'n=$(ls {bin_dir}/accepted.* 2>/dev/null | wc -l)\n'
                  f'if [ "$n" -ge 2 ]; then echo "qsub: would exceed queue max_queuable" >&2; exit 38; fi\n'
                  f'touch {bin_dir}/accepted.$n; echo "$((100 + n)).torque.example.org"')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = runner.invoke(cli, ["submit", str(configured), "--scheduler", "pbs"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: qsub failed (exit 38): qsub: would exceed queue max_queuable"]
    recorded = _recorded(configured)
    assert {fold: r.job_id for fold, r in recorded.items()} == {1: "100.torque.example.org",
                                                                2: "101.torque.example.org"}
    assert recorded[1].command[-1] == "1_train.pbs" and recorded[1].scheduler == "pbs"
    # The rerun submits only what is missing.
    for accepted in bin_dir.glob("accepted.*"):
        accepted.unlink()
    result = runner.invoke(cli, ["submit", str(configured), "--scheduler", "pbs", "--folds", "1-4"])
    assert result.exit_code == 0, result.stderr
    assert "fold 1: already submitted as job 100.torque.example.org" in result.stdout
    assert {fold: r.job_id for fold, r in _recorded(configured).items()} == {
        1: "100.torque.example.org", 2: "101.torque.example.org",
        3: "100.torque.example.org", 4: "101.torque.example.org"}


def test_unparseable_job_id_is_an_error(configured, monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    _fake_command(bin_dir, "sbatch", 'echo "Submitted batch job (queued)"')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SchedulerError, match="sbatch printed no job id"):
        jobs.submit_folds(configured, "slurm", folds=[1])
    assert not (configured / jobs.JOBS_FILE).exists()


def test_fold_without_configs_is_an_error(configured, runner, cli):
    (configured / "test_w32_6.txt").write_text("")
    # Rendering fold 6 needs its lists and DBs; without them, one line names what is missing.
    result = runner.invoke(cli, ["submit", str(configured), "--scheduler", "slurm", "--folds", "6", "--dry-run"])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


def test_jobs_file_is_checked(configured):
    (configured / jobs.JOBS_FILE).write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a lymph-cv jobs file"):
        jobs.load_jobs(configured)


# -- the local runner ---------------------------------------------------------------------
def test_local_runner_runs_jobs_with_states_and_afterok(tmp_path):
    workdir = tmp_path / "a b$c $(touch INJECTED)"
    workdir.mkdir()
    options = jobs.JobOptions(workers=1)
    first = jobs.submit_lymph_cv(workdir, "first", ["--version"], "local", options)
    failing = jobs.submit_lymph_cv(workdir, "failing", ["no-such-command"], "local", options)
    after_ok = jobs.submit_lymph_cv(workdir, "second", ["--version"], "local",
                                    jobs.JobOptions(workers=1, after=(first.job_id,)))
    after_failed = jobs.submit_lymph_cv(workdir, "never", ["--version"], "local",
                                        jobs.JobOptions(workers=1, after=(failing.job_id,)))
    states = jobs.wait_for_jobs(workdir, task=None, timeout=JOB_TIMEOUT_S, poll=POLL_S)
    assert states == {("first", None): "COMPLETED", ("failing", None): "FAILED",
                      ("second", None): "COMPLETED", ("never", None): "CANCELLED"}
    assert len({first.job_id, failing.job_id, after_ok.job_id, after_failed.job_id}) == 4
    by_task = {status.record.task: status for status in jobs.job_states(workdir, task=None)}
    assert by_task["failing"].exit_code == 2
    assert "lymph-cv, version" in by_task["second"].log.read_text()
    assert "No such command" in by_task["failing"].log.read_text()
    # afterok: the dependent job started only once the first had ended.
    state = lambda s: json.loads((workdir / jobs.LOCAL_DIR / f"{s.job_id}.json").read_text())  # noqa: E731
    assert state(after_ok)["started"] >= state(first)["ended"]
    assert "started" not in state(after_failed)
    # One worker: the jobs that ran never overlapped.
    spans = sorted((state(s)["started"], state(s)["ended"]) for s in (first, failing, after_ok))
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    assert not list(tmp_path.rglob("INJECTED"))

