"""Small synthetic work folders for the data-stage tests."""
from __future__ import annotations

from pathlib import Path

from lymph_cv.stages import folds, patches, synth


def list_workdir(root: Path, width: int, height: int, k: int = 2) -> Path:
    """``root`` with 6 synthetic images (2 per class) of ``width``×``height``, their patches in
    ``subs/`` and ``k``-fold lists; no databases."""
    synth.generate(root / "data", per_class=2, cases_per_class=1, width=width, height=height, workers=1)
    manifest = patches.extract_patches(root / "data", root / "subs", workers=1)
    folds.make_folds(manifest, root, k=k, seed=0)
    return root
