"""``compute_image_mean``: Caffe's tool, same flags — the mean image of a LevelDB/LMDB of Datums.

    compute_image_mean [FLAGS] INPUT_DB [OUTPUT_FILE]

Sums every record in key order in a float32 blob, divides by the count, writes a legacy
1 × C × H × W BlobProto to OUTPUT_FILE (when given) and logs the per-channel means.
``-backend`` defaults to lmdb as in Caffe; a database of the other kind is an error.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from lymph_cv import gflags
from lymph_cv.caffelog import caffe_log, fmt
from lymph_cv.commands.convert_imageset import info_level
from lymph_cv.errors import LymphCVError

PROGRAM = "compute_image_mean"
SYNOPSIS = ("Compute the mean image of a set of images given by a leveldb/lmdb.\n"
            f"Usage:\n    {PROGRAM} [FLAGS] INPUT_DB [OUTPUT_FILE]")
SRC = "compute_image_mean.cpp:{}"
#: compute_image_mean logs its progress every this many records.
PROGRESS_EVERY = 10000

FLAGS = {
    "backend": gflags.Flag(str, "lmdb", "database kind: lmdb or leveldb"),
}


def run(argv: Sequence[str]) -> int:
    """Parse Caffe-style flags and compute the mean; raises LymphCVError on bad input."""
    from lymph_cv import dbs
    from lymph_cv.caffe.blob import write_mean
    from lymph_cv.store import check_backend

    values, positional = gflags.parse(argv, FLAGS)
    if len(positional) not in (1, 2):
        raise LymphCVError(f"expected INPUT_DB [OUTPUT_FILE], got {len(positional)} argument(s); see {PROGRAM} -help")
    backend = check_backend(values["backend"])
    with caffe_log() as log:
        log.info("Starting iteration", SRC.format(71))
        mean, count = dbs.mean_of_db(positional[0], backend, progress=lambda n: log.info(f"Processed {n} files.", SRC.format(100)),
                                     progress_every=PROGRESS_EVERY)
        if count % PROGRESS_EVERY:
            log.info(f"Processed {count} files.", SRC.format(105))
        if len(positional) == 2:
            log.info(f"Write to {positional[1]}", SRC.format(113))
            write_mean(positional[1], mean)
        log.info(f"Number of channels: {mean.shape[0]}", SRC.format(117))
        for channel, value in enumerate(dbs.channel_means(mean)):
            log.info(f"mean_value channel [{channel}]: {fmt(value)}", SRC.format(124))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tools/compute_image_mean``: exit status 0, or 2 with one error line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    info_level()
    try:
        return run(argv)
    except gflags.HelpRequested:
        print(gflags.usage(PROGRAM, SYNOPSIS, FLAGS))
        return 0
    except LymphCVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
