"""``lymph-cv submit`` / ``lymph-cv jobs`` against a real one-node Slurm cluster with Torque wrappers."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from lymph_cv.cluster import jobs
from lymph_cv.errors import ConfigError, SchedulerError

FOLDS = 5
#: Seconds a test waits for its jobs: a tiny fold trains in a few seconds.
JOB_TIMEOUT_S = 150
POLL_S = 0.5
#: The tiny training run of every fold: a few iterations, one test pass, a final snapshot.
MAX_ITER = 4
TINY_SOLVER = {"max_iter": MAX_ITER, "test_iter": 1, "test_interval": MAX_ITER, "snapshot": MAX_ITER,
               "display": 1, "batch_size": 8}


# -- fixtures -----------------------------------------------------------------------------
def _invoke(runner, cli, *args: str) -> None:
    result = runner.invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, f"lymph-cv {' '.join(map(str, args))}: {result.stderr}"


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> Path:
    """A synthetic work directory through step 4 (patches, 5 folds, DBs, rendered configs), built once."""
    from click.testing import CliRunner

    from lymph_cv.cli import cli

    runner = CliRunner()
    root = tmp_path_factory.mktemp("tiny")
    data, workdir = root / "data", root / "work"
    _invoke(runner, cli, "synth", data, "--per-class", FOLDS, "--cases-per-class", 2, "--width", 200, "--height", 150,
            "--seed", 3)
    _invoke(runner, cli, "patches", data, workdir / "subs")
    _invoke(runner, cli, "folds", "make", workdir / "subs", workdir, "--k", FOLDS)
    _invoke(runner, cli, "dbs", workdir)
    settings = [arg for key, value in TINY_SOLVER.items() for arg in ("--set", f"{key}={value}")]
    _invoke(runner, cli, "render", workdir, *settings)
    return workdir


def _copy(workdir: Path, target: Path) -> Path:
    shutil.copytree(workdir, target, symlinks=True)
    return target


def _check_trained(workdir: Path, folds=range(1, FOLDS + 1)) -> None:
    """Every fold wrote its final snapshot, train.log and job output where the job script said."""
    for fold in folds:
        folder = workdir / str(fold)
        assert (folder / f"{fold}_caffenet_train_w32_iter_{MAX_ITER}.caffemodel").is_file()
        assert (folder / f"{fold}_caffenet_train_w32_iter_{MAX_ITER}.solverstate").is_file()
        assert "Optimization Done." in (folder / "train.log").read_text()
        assert (folder / f"{fold}_TASK_output.out").is_file()
        assert (folder / f"{fold}_train.exit").read_text().strip() == "0"


@pytest.fixture
def configured(tmp_path: Path) -> Path:
    """A work directory whose folds have lists and a solver file (for submission mechanics)."""
    workdir = tmp_path / "work"
    for fold in range(1, FOLDS + 1):
        (workdir / str(fold)).mkdir(parents=True)
        for side in ("train", "test"):
            (workdir / f"{side}_w32_{fold}.txt").write_text("")
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


def test_multi_node_scripts_start_one_rank_per_gpu(configured):
    spec = jobs.train_spec(configured, 1, "slurm")
    options = jobs.JobOptions(nodes=2, gpus_per_node=4, ppn=2)
    slurm = jobs.render_script(spec, "slurm", options)
    for directive in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-task=1",
                      "#SBATCH --cpus-per-task=2"):
        assert directive in slurm.splitlines()
    train = next(line for line in slurm.splitlines() if "lymph_cv train" in line)
    assert train.startswith("srun --kill-on-bad-exit=1 ") and train.count("--device cuda") == 1
    assert "--nodes=2" in jobs.submit_command(spec, "slurm", options)
    pbs = jobs.render_script(jobs.train_spec(configured, 1, "pbs"), "pbs", options)
    assert "#PBS -l nodes=2:ppn=8:gpus=4:exclusive_process" in pbs.splitlines()
    assert 'export MASTER_ADDR="$(head -n 1 "$PBS_NODEFILE")"' in pbs
    train = next(line for line in pbs.splitlines() if "lymph_cv train" in line)
    assert train.startswith('mpirun -np 8 --hostfile "$PBS_NODEFILE" --map-by ppr:4:node -x MASTER_ADDR ')
    assert subprocess.run(["bash", "-n"], input=pbs, text=True).returncode == 0
    local = jobs.render_script(jobs.train_spec(configured, 1, "local"), "local", jobs.JobOptions(tasks_per_node=2))
    assert "--device cpu --procs 2" in local
    one = jobs.render_script(spec, "slurm", jobs.JobOptions())
    assert "srun" not in one and "#SBATCH --ntasks=1" in one.splitlines()
    for bad in (dict(nodes=0), dict(gpus=1, gpus_per_node=2), dict(gpus_per_node=2, tasks_per_node=3)):
        with pytest.raises(ConfigError):
            jobs.JobOptions(**bad).validate()


def test_evaluation_job_depends_on_the_training_jobs(configured):
    submission = jobs.submit_evaluation(configured, "slurm", after=["11", "12"], args=["--no-oversample"],
                                        dry_run=True)
    assert "--dependency=afterok:11:12" in submission.command
    text = submission.script.read_text()
    for fold in range(1, FOLDS + 1):
        assert f"-m lymph_cv evaluate {configured.resolve()} -k {fold} --no-oversample || status=$?" in text
    assert f"-m lymph_cv report {configured.resolve()} || status=$?" in text
    assert subprocess.run(["bash", "-n", str(submission.script)]).returncode == 0


@pytest.mark.parametrize("option, value", [("--walltime", "1h; touch x"), ("--queue", "q$(id)"),
                                           ("--queue", "batch\n"), ("--mail", "a b@c"), ("--after", "1;2"),
                                           ("--walltime", "0:00:00")])  # accepted: a job killed at its start
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


def test_waiting_times_out_with_the_unfinished_jobs(configured, monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    _fake_command(bin_dir, "sbatch", 'echo "41;lymphcv"')
    _fake_command(bin_dir, "squeue", 'echo PENDING')
    _fake_command(bin_dir, "scontrol", 'exit 1')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    jobs.submit_folds(configured, "slurm", folds=[2])
    assert _recorded(configured)[2].job_id == "41"
    with pytest.raises(SchedulerError, match=r"timed out after 0s waiting for jobs \(train 2: PENDING\)"):
        jobs.wait_for_jobs(configured, timeout=0, poll=0)


def test_a_failed_scheduler_query_is_not_a_failed_job(configured, monkeypatch, tmp_path):
    """squeue/scontrol failing once under load must not end the wait with FAILED; a job that stays
    unknown without an exit file is FAILED after CONFIRM_POLLS polls."""
    bin_dir = tmp_path / "bin"
    _fake_command(bin_dir, "sbatch", 'echo "43;lymphcv"')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    jobs.submit_folds(configured, "slurm", folds=[3])
    counter = tmp_path / "polls"
    # First query fails (the job looks gone), the second shows it running, then it finishes.
    _fake_command(bin_dir, "squeue", f'n=$(cat {counter} 2>/dev/null || echo 0); echo $((n+1)) > {counter}; '
                                     f'[ "$n" -ge 1 ] && echo RUNNING; [ "$n" -ge 2 ] && echo 0 > '
                                     f'"{configured}/3/3_train.exit"; exit 0')
    _fake_command(bin_dir, "scontrol", "exit 1")
    assert jobs.wait_for_jobs(configured, timeout=30, poll=0) == {3: "COMPLETED"}
    (configured / "3" / "3_train.exit").unlink()
    _fake_command(bin_dir, "squeue", "exit 0")  # never listed again, no exit file: really failed
    assert jobs.wait_for_jobs(configured, timeout=30, poll=0) == {3: "FAILED"}


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



# -- real jobs on the Slurm cluster -------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["pbs", "slurm"])
def test_five_folds_train_as_cluster_jobs(slurm_cluster, tiny_workdir, tmp_path, runner, cli, scheduler):
    workdir = _copy(tiny_workdir, tmp_path / "work")
    result = runner.invoke(cli, ["submit", str(workdir), "--scheduler", scheduler, "--walltime", "00:10:00"])
    assert result.exit_code == 0, result.stderr
    recorded = _recorded(workdir)
    assert sorted(recorded) == list(range(1, FOLDS + 1))
    assert len({r.job_id for r in recorded.values()}) == FOLDS
    assert all(r.scheduler == scheduler for r in recorded.values())

    if scheduler == "slurm":
        states = jobs.wait_for_jobs(workdir, timeout=JOB_TIMEOUT_S, poll=POLL_S)
        assert states == {fold: "COMPLETED" for fold in range(1, FOLDS + 1)}
        shown = runner.invoke(cli, ["jobs", str(workdir)])
    else:
        shown = runner.invoke(cli, ["jobs", str(workdir), "--wait", "--timeout", str(JOB_TIMEOUT_S)])
    _check_trained(workdir)

    assert shown.exit_code == 0, shown.stderr
    rows = shown.stdout.strip().splitlines()[1:]
    assert len(rows) == FOLDS and all("COMPLETED" in row and scheduler in row for row in rows)
    assert str(workdir / "3" / "3_TASK_output.out") in shown.stdout

    again = runner.invoke(cli, ["submit", str(workdir), "--scheduler", scheduler])
    assert again.exit_code == 0 and again.stdout.count("already submitted") == FOLDS
    assert _recorded(workdir) == recorded


def _check_job(workdir: Path, after: list, scheduler: str) -> jobs.Submission:
    """A job running ``lymph-cv jobs WORKDIR`` once ``after`` succeeded: its log shows what it saw."""
    return jobs.submit_lymph_cv(workdir, "check", ["jobs", str(workdir)], scheduler,
                                jobs.JobOptions(walltime="00:10:00", after=tuple(after)))


def _rows_seen_by(workdir: Path, submission: jobs.Submission) -> list:
    output = workdir / "CHECK_TASK_output.out"
    return [line.split() for line in output.read_text().splitlines()[1:] if line.strip()]


def test_pbs_afterok_chain_in_a_workdir_named_with_shell_characters(slurm_cluster, tiny_workdir, tmp_path,
                                                                     runner, cli):
    workdir = _copy(tiny_workdir, tmp_path / "a b$c")
    result = runner.invoke(cli, ["submit", str(workdir), "--scheduler", "pbs", "--folds", "1-2",
                                 "--walltime", "00:10:00"])
    assert result.exit_code == 0, result.stderr
    check = _check_job(workdir, jobs.training_job_ids(workdir), "pbs")
    assert check.command[check.command.index("-W") + 1].startswith("depend=afterok:")

    states = jobs.wait_for_jobs(workdir, task=None, timeout=JOB_TIMEOUT_S, poll=POLL_S)
    assert set(states.values()) == {"COMPLETED"}
    _check_trained(workdir, folds=(1, 2))
    # The chained job ran after both folds had finished: it saw them completed.
    assert [(row[1], row[4]) for row in _rows_seen_by(workdir, check)] == [("1", "COMPLETED"), ("2", "COMPLETED")]
    # Nothing was expanded: no "a b" folder, no stray files beside the work directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a b$c"]


def test_slurm_array_job_then_afterok_chains(slurm_cluster, tiny_workdir, tmp_path, runner, cli):
    workdir = _copy(tiny_workdir, tmp_path / "work")
    result = runner.invoke(cli, ["submit", str(workdir), "--scheduler", "slurm", "--folds", "3-4", "--array",
                                 "--walltime", "00:10:00", "--evaluate"])
    assert result.exit_code == 0, result.stderr
    recorded = _recorded(workdir)
    array_id = recorded[3].array_id
    assert f"--dependency=afterok:{array_id}" in recorded[None].command and recorded[None].task == "evaluate"
    assert array_id and recorded[4].array_id == array_id
    assert (recorded[3].job_id, recorded[4].job_id) == (f"{array_id}_3", f"{array_id}_4")
    assert "--array=3-4" in recorded[3].command
    assert jobs.training_job_ids(workdir) == [array_id]
    check = _check_job(workdir, [array_id], "slurm")
    assert f"--dependency=afterok:{array_id}" in check.command

    states = jobs.wait_for_jobs(workdir, task=None, timeout=JOB_TIMEOUT_S, poll=POLL_S)
    assert set(states.values()) == {"COMPLETED"}
    _check_trained(workdir, folds=(3, 4))
    assert [(row[1], row[4]) for row in _rows_seen_by(workdir, check)] == [("3", "COMPLETED"), ("4", "COMPLETED")]
    # The evaluation job evaluated both folds, then pooled them.
    assert (workdir / "eval" / "fold_3").is_dir() and (workdir / "eval" / "fold_4").is_dir()
    assert (workdir / "eval" / "report.md").is_file()


def test_failed_dependency_cancels_the_chained_slurm_job(slurm_cluster, configured):
    # The solver of fold 1 is not a real one: its training fails, so its dependant never runs.
    (submission,) = jobs.submit_folds(configured, "slurm", folds=[1], options=jobs.JobOptions(walltime="00:05:00"))
    check = _check_job(configured, [submission.job_id], "slurm")
    states = jobs.wait_for_jobs(configured, task=None, timeout=JOB_TIMEOUT_S, poll=POLL_S)
    assert states == {("train", 1): "FAILED", ("check", None): "CANCELLED"}
    (failed,) = jobs.job_states(configured)
    assert failed.exit_code == 2 and "error: " in failed.log.read_text()
    assert not (configured / "CHECK_TASK_output.out").exists() and check.job_id
    with pytest.raises(SchedulerError, match=r"training did not succeed for fold 1 \(FAILED\)"):
        jobs.submit_evaluation(configured, "slurm")


def test_local_runner_trains_a_fold(tiny_workdir, tmp_path, runner, cli):
    workdir = _copy(tiny_workdir, tmp_path / "work")
    result = runner.invoke(cli, ["submit", str(workdir), "--scheduler", "local", "--folds", "5"])
    assert result.exit_code == 0, result.stderr
    assert jobs.wait_for_jobs(workdir, timeout=JOB_TIMEOUT_S, poll=POLL_S) == {5: "COMPLETED"}
    _check_trained(workdir, folds=(5,))


def test_missing_fold_configs_are_rendered(tiny_workdir, tmp_path, runner, cli):
    workdir = _copy(tiny_workdir, tmp_path / "work")
    shutil.rmtree(workdir / "2")
    result = runner.invoke(cli, ["submit", str(workdir), "--scheduler", "slurm", "--folds", "2", "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert jobs.solver_path(workdir, 2).is_file() and (workdir / "2" / "2_train.slurm").is_file()
    assert result.stdout.startswith(f"cd {workdir / '2'} && sbatch --parsable --job-name=2_TASK")


def test_local_runner_stopped_by_a_signal_stops_its_job_and_records_cancelled(tmp_path):
    """SIGTERM to a local runner used to leave the job's training running, unseen, after the slot
    was freed for the next job; now the job's processes get the signal and the runner waits for them."""
    import signal
    import sys
    import time

    folder = tmp_path / jobs.LOCAL_DIR
    (folder / "slots").mkdir(parents=True)
    state_path = folder / "1.json"
    state_path.write_text("{}")
    script = tmp_path / "job.sh"
    # like a training: on SIGTERM it finishes its snapshot, then exits 0; bash itself dies at once
    script.write_text(f"{sys.executable} -c 'import signal, sys, time\n"
                      "def stop(*_):\n    time.sleep(0.3); open(\"snapshot\", \"w\").close(); sys.exit(0)\n"
                      "signal.signal(signal.SIGTERM, stop)\nopen(\"started\", \"w\").close()\ntime.sleep(60)'\n")
    runner = subprocess.Popen([sys.executable, "-m", "lymph_cv.cluster.jobs", str(state_path), str(script), "1"], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
    finally:
        if runner.poll() is None:
            runner.kill()
    state = json.loads(state_path.read_text())
    assert state["state"] == jobs.CANCELLED and state["reason"] == f"signal {int(signal.SIGTERM)}"
    assert (tmp_path / "snapshot").exists(), "the runner did not wait for the job to finish its snapshot"


def test_a_two_task_slurm_job_trains_one_fold_on_two_ranks(slurm_cluster, tiny_workdir, tmp_path, runner, cli):
    workdir = _copy(tiny_workdir, tmp_path / "work")
    result = runner.invoke(cli, ["submit", str(workdir), "--scheduler", "slurm", "--folds", "1",
                                 "--ntasks-per-node", "2", "--walltime", "00:10:00"])
    assert result.exit_code == 0, result.stderr
    states = jobs.wait_for_jobs(workdir, timeout=JOB_TIMEOUT_S, poll=POLL_S)
    assert states == {1: "COMPLETED"}, (workdir / "1" / "1_TASK_output.out").read_text()
    _check_trained(workdir, folds=[1])
    log = (workdir / "1" / "train.log").read_text()
    assert "Training on 2 processes (srun)" in log and log.count("Optimization Done.") == 1
    shown = runner.invoke(cli, ["jobs", str(workdir)])
    assert shown.exit_code == 0 and "COMPLETED" in shown.stdout
