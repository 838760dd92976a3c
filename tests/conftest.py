"""Fixtures shared by every test module."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from cluster import ClusterError, SlurmCluster
from lymph_cv.core.threads import configure_openmp

# Sleeping OpenMP waits, set before any test module imports torch (see lymph_cv.core.threads).
configure_openmp()

REPO_ROOT = Path(__file__).resolve().parent.parent


def reference_dir() -> Path:
    """The published tutorial models: ``$LYMPH_CV_REFERENCE`` or ``../shared/reference/...``."""
    env = os.environ.get("LYMPH_CV_REFERENCE")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "reference" / "janowczyk-uc7" / "models"


@pytest.fixture(scope="session")
def reference() -> Path:
    """Folder of the published models; fails under CI when missing, skips elsewhere."""
    path = reference_dir()
    if not path.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"reference folder missing: {path}")
        pytest.skip(f"reference folder missing: {path} (set LYMPH_CV_REFERENCE)")
    return path


@pytest.fixture
def runner() -> CliRunner:
    """Click's in-process runner, with stderr kept apart from stdout."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 always separates the streams
        return CliRunner()


@pytest.fixture
def cli():
    """The ``lymph-cv`` click group, for ``runner.invoke(cli, [...])``."""
    from lymph_cv.cli import cli as group

    return group


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


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The fault-injection suite's case count (issue 11 asks for it in the summary)."""
    passed = failed = 0
    for outcome in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", "call") == "call" and "test_faults.py::" in report.nodeid:
                if outcome == "passed":
                    passed += 1
                else:
                    failed += 1
    if passed or failed:
        terminalreporter.write_line(f"fault-injection cases: {passed + failed} ({passed} passed, {failed} failed)")
