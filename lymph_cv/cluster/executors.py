"""The cluster schedulers as executors of the run's train stage (``lymph-cv run --executor pbs|slurm``):
submit the folds' training jobs, wait for them, fail with the states of those that did not complete."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lymph_cv.errors import TrainingError
from lymph_cv.stages.stage import RunOptions, register_executor

def train_on_cluster(o: RunOptions, folds: Sequence[int], scheduler: str) -> None:
    """Train ``folds`` as jobs of ``scheduler`` (resubmitting stopped ones) and wait for them."""
    # imported here: the job engine loads jinja2 and the renderer, which `run --help` need not
    from lymph_cv.cluster import jobs

    options = o.job_options or jobs.JobOptions()
    jobs.submit_folds(Path(o.workdir), scheduler, folds, options=options, resubmit=True)
    states = jobs.wait_for_jobs(Path(o.workdir), jobs.TRAIN_TASK, timeout=o.job_timeout)
    failed = {k: s for k, s in states.items() if k in folds and s != jobs.COMPLETED}
    if failed:
        detail = ", ".join(f"fold {k}: {s}" for k, s in sorted(failed.items()))
        raise TrainingError(f"training jobs did not complete ({detail}); see `lymph-cv jobs {o.workdir}`")


@register_executor("pbs")
def train_on_pbs(o: RunOptions, folds: Sequence[int]) -> None:
    train_on_cluster(o, folds, "pbs")


@register_executor("slurm")
def train_on_slurm(o: RunOptions, folds: Sequence[int]) -> None:
    train_on_cluster(o, folds, "slurm")
