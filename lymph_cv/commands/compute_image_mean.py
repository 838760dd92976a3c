"""``compute_image_mean``: Caffe's tool, same flags — the mean image of a LevelDB/LMDB of Datums.

    compute_image_mean [FLAGS] INPUT_DB [OUTPUT_FILE]

Sums every record in key order in a float32 blob, divides by the count, writes a legacy
1 × C × H × W BlobProto to OUTPUT_FILE (when given) and logs the per-channel means.
``-backend`` defaults to lmdb as in Caffe; a database of the other kind is an error.
"""
from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING unimported: typing is ~5 ms of the tools' start-up (issue 17)
if TYPE_CHECKING:
    from typing import Optional, Sequence

from lymph_cv.core.threads import quiet_numpy_blas
from lymph_cv.formats import gflags
from lymph_cv.formats.caffe.meanscan import MEAN_PROGRESS_EVERY
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
    # The store and the native module only (numpy when the native way does not apply):
    # start-up is most of this tool's time on a small database.
    from lymph_cv.formats.caffe import meanscan
    from lymph_cv.formats.store import check_backend

    if len(positional) not in (1, 2):
        raise LymphCVError(f"expected INPUT_DB [OUTPUT_FILE], got {len(positional)} argument(s); see {PROGRAM} -help")
    backend = check_backend(values["backend"])
    with caffe_log() as log:
        log.info("Starting iteration", SRC.format(71))

        def progress(count: int) -> None:
            log.info(f"Processed {count} files.", SRC.format(100))

        try:
            native = meanscan.native_mean_of_db(positional[0], backend)
        except meanscan.NativeUnavailable:
            return _run_numpy(positional, backend, log, progress)
        for done in range(MEAN_PROGRESS_EVERY, native.count + 1, MEAN_PROGRESS_EVERY):
            progress(done)
        _log_end(log, positional, native.count, native.shape[0], native.channel_means,
                 lambda path: meanscan.write_native_mean(path, native))
    return 0


def _run_numpy(positional: list[str], backend: str, log, progress) -> int:
    """The numpy path: encoded or float_data records, or the native module off or not built."""
    from lymph_cv.formats.caffe import mean as mean_module

    mean, count = mean_module.mean_of_db(positional[0], backend, progress=progress, native=False)
    _log_end(log, positional, count, mean.shape[0], mean_module.channel_means(mean),
             lambda path: mean_module.write_mean(path, mean))
    return 0


def _log_end(log, positional: list[str], count: int, channels: int, channel_means, write) -> None:
    """The tool's closing lines (and the mean file, when asked), as Caffe's tool logs them."""
    if count % MEAN_PROGRESS_EVERY:
        log.info(f"Processed {count} files.", SRC.format(105))
    if len(positional) == 2:
        log.info(f"Write to {positional[1]}", SRC.format(113))
        write(positional[1])
    log.info(f"Number of channels: {channels}", SRC.format(117))
    for channel, value in enumerate(channel_means):
        log.info(f"mean_value channel [{channel}]: {fmt(value)}", SRC.format(124))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tools/compute_image_mean``: exit status 0, or 2 with one error line."""
    quiet_numpy_blas()  # before numpy loads: no linear algebra here
    return gflags.run_tool(run, argv, PROGRAM, SYNOPSIS, FLAGS)
