"""``compute_image_mean``: Caffe's tool, same flags — the mean image of a LevelDB/LMDB of Datums.

    compute_image_mean [FLAGS] INPUT_DB [OUTPUT_FILE]

Sums every record in key order in a float32 blob, divides by the count, writes a legacy
1 × C × H × W BlobProto to OUTPUT_FILE (when given) and logs the per-channel means.
``-backend`` defaults to lmdb as in Caffe; a database of the other kind is an error.
"""
from __future__ import annotations

from typing import Optional, Sequence

from lymph_cv.core.threads import quiet_numpy_blas
from lymph_cv.formats import gflags
from lymph_cv.formats.caffelog import caffe_log, fmt
from lymph_cv.errors import LymphCVError

PROGRAM = "compute_image_mean"
SYNOPSIS = ("Compute the mean image of a set of images given by a leveldb/lmdb.\n"
            f"Usage:\n    {PROGRAM} [FLAGS] INPUT_DB [OUTPUT_FILE]")
SRC = "compute_image_mean.cpp:{}"

FLAGS = {
    "backend": gflags.Flag(str, "lmdb", "database kind: lmdb or leveldb"),
}


def run(values: dict, positional: list[str]) -> int:
    """Compute the mean with parsed flags; raises LymphCVError on bad input."""
    # numpy and the store only: start-up is most of this tool's time on a small database.
    from lymph_cv.formats.caffe import mean as mean_module
    from lymph_cv.formats.store import check_backend

    if len(positional) not in (1, 2):
        raise LymphCVError(f"expected INPUT_DB [OUTPUT_FILE], got {len(positional)} argument(s); see {PROGRAM} -help")
    backend = check_backend(values["backend"])
    with caffe_log() as log:
        log.info("Starting iteration", SRC.format(71))
        mean, count = mean_module.mean_of_db(positional[0], backend,
                                             progress=lambda n: log.info(f"Processed {n} files.", SRC.format(100)))
        if count % mean_module.MEAN_PROGRESS_EVERY:
            log.info(f"Processed {count} files.", SRC.format(105))
        if len(positional) == 2:
            log.info(f"Write to {positional[1]}", SRC.format(113))
            mean_module.write_mean(positional[1], mean)
        log.info(f"Number of channels: {mean.shape[0]}", SRC.format(117))
        for channel, value in enumerate(mean_module.channel_means(mean)):
            log.info(f"mean_value channel [{channel}]: {fmt(value)}", SRC.format(124))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tools/compute_image_mean``: exit status 0, or 2 with one error line."""
    quiet_numpy_blas()  # before numpy loads: no linear algebra here
    return gflags.run_tool(run, argv, PROGRAM, SYNOPSIS, FLAGS)
