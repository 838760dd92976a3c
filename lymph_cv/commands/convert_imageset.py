"""``convert_imageset``: Caffe's tool, same flags — a list of images into a LevelDB/LMDB of Datums.

    convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME

Each list line is ``<file> <label>`` (split at the last run of whitespace); the image read is
ROOTFOLDER + file (plain concatenation, as Caffe does; the file must stay under the root).
Flags as in Caffe (``-flag value``, ``--flag=value``, ``-noflag``), plus ``-seed`` (Caffe's
``-shuffle`` is unseeded; ours is repeatable), ``-overwrite`` and ``-skip_bad``.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from lymph_cv.core import timeline
from lymph_cv.core.threads import keep_freed_memory, quiet_numpy_blas, usable_cores
from lymph_cv.formats import gflags
from lymph_cv.formats.caffelog import caffe_log
from lymph_cv.errors import LymphCVError

PROGRAM = "convert_imageset"
SYNOPSIS = ("Convert a set of images to the leveldb/lmdb format used as input for Caffe.\n"
            f"Usage:\n    {PROGRAM} [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME")
SRC = "convert_imageset.cpp:{}"

FLAGS = {
    "gray": gflags.Flag(bool, False, "read images as single-channel grayscale"),
    "shuffle": gflags.Flag(bool, False, "shuffle the list before writing (seeded by -seed)"),
    "backend": gflags.Flag(str, "lmdb", "database kind: lmdb or leveldb"),
    "resize_width": gflags.Flag(int, 0, "resize to this width (needs -resize_height too)"),
    "resize_height": gflags.Flag(int, 0, "resize to this height (needs -resize_width too)"),
    "check_size": gflags.Flag(bool, False, "require every datum to have the first one's size"),
    "encoded": gflags.Flag(bool, False, "store compressed image bytes instead of pixels"),
    "encode_type": gflags.Flag(str, "", "format of -encoded data (png, jpg, ...; default: the file's extension)"),
    "seed": gflags.Flag(int, 0, "seed of -shuffle (lymph_cv; Caffe's shuffle is not repeatable)"),
    "overwrite": gflags.Flag(bool, False, "replace an existing DB_NAME (lymph_cv)"),
    "skip_bad": gflags.Flag(bool, False, "skip unreadable images with a warning, as Caffe does (lymph_cv)"),
    "workers": gflags.Flag(int, 0, "processes reading and decoding images while this one writes in list order; "
                                   "0: one per core (none on one core: read here) (lymph_cv)"),
}


def run(values: dict, positional: list[str]) -> int:
    """Convert with parsed flags; raises LymphCVError on bad input."""
    timeline.mark("flags parsed")
    from lymph_cv.formats import store
    from lymph_cv.stages import dbs
    from lymph_cv.stages.dbs.lists import scan_image_list

    if len(positional) != 3:
        raise LymphCVError(f"expected ROOTFOLDER/ LISTFILE DB_NAME, got {len(positional)} argument(s); see {PROGRAM} -help")
    root, list_file, db_name = positional
    backend = store.check_backend(values["backend"])
    if values["workers"] < 0:
        raise LymphCVError(f"-workers: must be 0 (one per core but the writer's) or more, got {values['workers']}")
    if values["seed"] < 0:
        raise LymphCVError(f"-seed: must be a non-negative integer, got {values['seed']}")
    if os.path.exists(db_name) and not values["overwrite"]:
        raise LymphCVError("already exists; pass -overwrite to replace it", db_name)
    options = dbs.ImageOptions(
        gray=values["gray"],
        resize_width=max(0, values["resize_width"]),
        resize_height=max(0, values["resize_height"]),
        encoded=values["encoded"],
        encode_type=values["encode_type"],
        check_size=values["check_size"],
    )
    with caffe_log() as log:
        if values["shuffle"]:
            log.info(f"Shuffling data (seed {values['seed']})", SRC.format(86))
        timeline.mark("imported")
        entries = scan_image_list(list_file)
        timeline.mark("list read")
        log.info(f"A total of {len(entries)} images.", SRC.format(89))
        result = dbs.convert_list(
            root, list_file, db_name,
            backend=backend,
            seed=values["seed"] if values["shuffle"] else None,
            options=options,
            overwrite=values["overwrite"],
            skip_bad=values["skip_bad"],
            progress=lambda count: log.info(f"Processed {count} files.", SRC.format(146)),
            concat_root=True,
            entries=entries,
            workers=values["workers"] if values["workers"] > 0 else _default_readers(),
        )
        for problem in result.problems:
            log.warning(problem, SRC.format(121))
        if result.records % store.COMMIT_EVERY:
            log.info(f"Processed {result.records} files.", SRC.format(152))
    timeline.mark("done")
    return 0


def _default_readers() -> int:
    """One reader per core, none on a single core: the writer is the lighter side (LevelDB's tables
    written natively take less than reading the files), so it shares a core with a reader."""
    cores = usable_cores()
    return cores if cores > 1 else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tools/convert_imageset``: exit status 0, or 2 with one error line."""
    timeline.mark("started")
    quiet_numpy_blas()  # before numpy loads: no linear algebra here
    # Each chunk of records takes megabyte buffers; with glibc's default threshold they were mapped
    # afresh and faulted in each time in a reader (up to 50,000 faults a run, 0.2 s): kept instead.
    keep_freed_memory()
    return gflags.run_tool(run, argv, PROGRAM, SYNOPSIS, FLAGS)
