"""``lymph-cv pycaffe-path``: the folder to put on PYTHONPATH so ``import caffe`` is lymph_cv's pycaffe."""
from __future__ import annotations

import click

from lymph_cv.core.resources import pycaffe_compat_dir


@click.command("pycaffe-path")
def pycaffe_path() -> None:
    """Print the folder holding a `caffe` package for legacy scripts (put it on PYTHONPATH).

    PYTHONPATH=$(lymph-cv pycaffe-path) python old_script.py runs a pycaffe script unmodified."""
    click.echo(str(pycaffe_compat_dir()))
