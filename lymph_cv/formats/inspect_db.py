"""What a LevelDB/LMDB database holds, for ``lymph-cv inspect DB``: the part known at once (backend,
first keys), then the totals that need a scan of every record (count, datum shapes, labels).

Only the store is loaded to open the database, so the first lines appear at the interpreter's
start-up floor; the Datum parser (protobuf, numpy) loads for the scan.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from lymph_cv.errors import FormatError
from lymph_cv.formats.store import open_reader

PathLike = Union[str, os.PathLike]
Description = Dict[str, Any]
#: Default number of database keys listed.
DEFAULT_KEY_LIMIT = 10


def describe_db(path: PathLike, limit: int = DEFAULT_KEY_LIMIT,
                on_header: Optional[Callable[[Description], None]] = None) -> Description:
    """Record count, first keys, datum shape(s) and label histogram of a LevelDB/LMDB database.

    ``on_header`` gets the part known before the scan (``path``, ``backend``, ``first_keys``:
    :func:`format_db_header` shows it) once the database is open and its first record is a Datum."""
    # protobuf's Datum only: numpy loads for an encoded image, the progress bar after the header
    from lymph_cv.formats.caffe import caffe_pb2

    path = Path(path)
    labels: collections.Counter = collections.Counter()
    shapes: collections.Counter = collections.Counter()
    encoded = 0

    def add(datum) -> None:
        nonlocal encoded
        labels[int(datum.label)] += 1
        if datum.encoded:
            encoded += 1
            if not shapes:  # decoding every image would be slow; the first one tells the shape
                from lymph_cv.formats.caffe.datum import decode_image

                shapes[tuple(decode_image(datum.data).shape)] += 1
        else:
            shapes[(datum.channels, datum.height, datum.width)] += 1

    with open_reader(path) as reader:
        header = {"kind": "db", "path": str(path), "backend": reader.backend,
                  "first_keys": [key.decode("utf-8", "replace") for key in reader.keys(limit)]}
        values = reader.values()
        first = next(values, None)
        datum = caffe_pb2.Datum()
        if first is not None:  # a database of something else is the one error line, without a header
            _parse(datum, first, 0, path)
            add(datum)
        if on_header is not None:
            on_header(header)
        from tqdm import tqdm

        for index, value in enumerate(tqdm(values, desc="records", unit="rec", leave=False, disable=None), start=1):
            _parse(datum, value, index, path)
            add(datum)
    return {
        **header,
        "records": sum(labels.values()),
        "datum_shape": list(shapes.most_common(1)[0][0]) if shapes else None,
        "datum_shapes": {"x".join(map(str, s)): n for s, n in sorted(shapes.items())},
        "encoded": encoded,
        "label_histogram": {str(label): n for label, n in sorted(labels.items())},
    }


def _parse(datum, value: bytes, index: int, path: Path) -> None:
    """``value`` parsed into ``datum`` (cleared first); FormatError naming the record otherwise."""
    try:
        datum.ParseFromString(value)  # replaces every field
    except Exception as exc:  # the protobuf runtime raises DecodeError or RuntimeError
        raise FormatError(f"record {index}: not a serialized Caffe Datum ({exc})", path) from exc


def format_db_header(info: Description) -> str:
    """The lines of :func:`describe_db`'s header: database, backend, first keys."""
    lines = [f"database: {info['path']} ({info['backend']})", f"first keys ({len(info['first_keys'])}):"]
    lines += [f"  {key}" for key in info["first_keys"]]
    return "\n".join(lines) + "\n"


def format_db_totals(info: Description) -> str:
    """The lines of :func:`describe_db`'s scan: records, datum shape(s), labels."""
    labels = ", ".join(f"{label}: {count}" for label, count in info["label_histogram"].items()) or "-"
    shape = "x".join(map(str, info["datum_shape"])) if info["datum_shape"] else "-"
    lines: List[str] = [f"records: {info['records']}",
                        f"datum shape: {shape}" + (f" ({info['encoded']} encoded)" if info["encoded"] else "")]
    if len(info["datum_shapes"]) > 1:
        lines.append("datum shapes: " + ", ".join(f"{s}: {n}" for s, n in info["datum_shapes"].items()))
    lines.append(f"labels: {labels}")
    return "\n".join(lines) + "\n"
