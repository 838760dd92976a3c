"""``lymph-cv import``: bring a published data set into the work-directory layout (``import pcam``)."""
from __future__ import annotations

from pathlib import Path

import click

from lymph_cv.commands.defaults import H5_READ_CHUNK


@click.group("import")
def import_group() -> None:
    """Import a published data set into a work directory (`import pcam DIR WORKDIR`)."""


@import_group.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--backend", type=click.Choice(["leveldb", "lmdb"]), default="leveldb", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace databases a previous import left.")
@click.option("--chunk", type=click.IntRange(min=1), default=H5_READ_CHUNK, show_default=True,
              help="Patches read per HDF5 slice (memory stays at one slice).")
def pcam(folder: Path, workdir: Path, backend: str, overwrite: bool, chunk: int) -> None:
    """PatchCamelyon's camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 in FOLDER → fold 1 of
    WORKDIR: train → DB_train_1, valid → DB_test_1, test → DB_heldout_1 (BGR Datums), lists, mean."""
    from lymph_cv.stages.pcam import import_pcam

    splits = import_pcam(folder, workdir, backend=backend, overwrite=overwrite, chunk=chunk)
    for split in splits.values():
        click.echo(f"{split.split}: {split.count} patches ({split.positives} tumour) -> {split.db}")
