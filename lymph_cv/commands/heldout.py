"""``lymph-cv heldout``: score a fold's snapshot on the held-out split an import left (PCam's test)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from lymph_cv.commands.options import DEVICE


@click.command()
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--fold", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Caffemodel to score [default: the fold's newest snapshot].")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="torch device (auto: CUDA when available).")
@click.option("--tta", is_flag=True, help="Average each patch's 8 symmetries (flips and quarter turns).")
def heldout(workdir: Path, fold: int, model: Optional[Path], device: str, tta: bool) -> None:
    """Accuracy, ROC AUC (curve in roc.png, operating threshold) and confusion of a fold's net on
    DB_heldout_K (eval/heldout_K/metrics.json)."""
    from lymph_cv.stages.pcam import score_heldout

    metrics = score_heldout(workdir, model, fold=fold, device=device, tta=tta)
    import json

    click.echo(json.dumps({k: metrics[k] for k in ("records", "accuracy", "auc", "threshold", "tta", "confusion")}))
