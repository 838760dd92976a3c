"""Helpers for the render/net/pycaffe tests: fold lists and rendered fold folders."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from lymph_cv.stages.render import RenderedFold, render_fold

CLASSES = 3
TRAIN_LINES = 300
TEST_LINES = 260  # 260 // 128 = 2 test batches


def write_lists(workdir: Path, folds: Iterable[int] = (1,), train_lines: int = TRAIN_LINES,
                test_lines: int = TEST_LINES, classes: int = CLASSES) -> Path:
    """``train_w32_K.txt`` / ``test_w32_K.txt`` with tab-separated labels 0..classes-1."""
    workdir.mkdir(parents=True, exist_ok=True)
    for fold in folds:
        for kind, count in (("train", train_lines), ("test", test_lines)):
            lines = [f"CLL_case{i}_sub_{i}.png\t{i % classes}\n" for i in range(count)]
            (workdir / f"{kind}_w32_{fold}.txt").write_text("".join(lines))
    return workdir


def rendered(workdir: Path, fold: int = 1, **options) -> RenderedFold:
    """Lists for ``fold`` (if absent) and its rendered files."""
    if not (workdir / f"test_w32_{fold}.txt").exists():
        write_lists(workdir, (fold,))
    return render_fold(workdir, fold, **options)
