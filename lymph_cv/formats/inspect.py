"""Recognise a Caffe file or database by its contents and describe it as plain data.

:func:`describe` returns a JSON-ready dict whose ``kind`` is one of ``caffemodel``,
``solverstate``, ``mean``, ``net``, ``solver`` or ``db``; :func:`format_description` turns
it into the text ``lymph-cv inspect`` prints.  Binary files are tried as caffemodel,
solver state and mean file in turn, each with sanity checks (no fields foreign to the
message, consistent blob sizes), so a random or truncated file is rejected, not guessed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
from google.protobuf import json_format

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.blob import blob_shape, has_legacy_dims, mean_array, parse_blob
from lymph_cv.formats.caffe.model import layer_type, net_layers, net_params, parse_caffemodel, parse_solverstate
from lymph_cv.formats.caffe.prototxt import (check_layer_types, format_text, parse_net_text, parse_solver_text,
                                              upgrade_net)
from lymph_cv.errors import FormatError
from lymph_cv.formats.inspect_db import DEFAULT_KEY_LIMIT, describe_db, format_db_header, format_db_totals
from lymph_cv.formats.store import detect_backend

PathLike = Union[str, os.PathLike]
Description = Dict[str, Any]

#: Digits kept for floating-point summaries (channel means).
SUMMARY_DECIMALS = 4
#: Channel names of a 3-channel Caffe image blob (OpenCV order).
BGR = ("B", "G", "R")
EXPECTED_ANY = (
    "expected a .caffemodel, .solverstate, mean .binaryproto, net or solver .prototxt, "
    "or a LevelDB/LMDB directory"
)
_PHASE_NAMES = {caffe_pb2.TRAIN: "TRAIN", caffe_pb2.TEST: "TEST"}


# --------------------------------------------------------------------------- describers


def _describe_caffemodel(net: caffe_pb2.NetParameter, path: Path) -> Description:
    params = net_params(net, path)
    layers = []
    legacy = False
    for layer in net_layers(net):
        arrays = params.get(layer.name, [])
        legacy = legacy or any(has_legacy_dims(blob) for blob in layer.blobs)
        layers.append(
            {
                "name": layer.name,
                "type": layer_type(layer),
                "blobs": [list(a.shape) for a in arrays],
                "params": int(sum(a.size for a in arrays)),
            }
        )
    return {
        "kind": "caffemodel",
        "path": str(path),
        "name": net.name,
        "format": "V2" if len(net.layer) else "V1",
        "legacy_blob_dims": legacy,
        "layers": layers,
        "total_params": sum(layer["params"] for layer in layers),
    }


def _describe_solverstate(state: caffe_pb2.SolverState, path: Path) -> Description:
    return {
        "kind": "solverstate",
        "path": str(path),
        "iter": int(state.iter),
        "learned_net": state.learned_net,
        "history_count": len(state.history),
        "history_shapes": [list(blob_shape(blob)) for blob in state.history],
        "current_step": int(state.current_step),
    }


def _describe_mean(blob: caffe_pb2.BlobProto, path: Path) -> Description:
    mean = mean_array(blob, path)
    channels = mean.shape[0]
    # Caffe's own summary: float32 sum over each channel divided by H*W.
    sums = mean.reshape(channels, -1).sum(axis=1, dtype=np.float32)
    means = sums / np.float32(mean.shape[1] * mean.shape[2])
    return {
        "kind": "mean",
        "path": str(path),
        "shape": list(mean.shape),
        "legacy_blob_dims": has_legacy_dims(blob),
        "channel_order": "".join(BGR) if channels == len(BGR) else None,
        "channel_means": [round(float(m), SUMMARY_DECIMALS) for m in means],
        "min": float(mean.min()),
        "max": float(mean.max()),
    }


def _layer_phase(layer: caffe_pb2.LayerParameter) -> Optional[str]:
    phases = {_PHASE_NAMES.get(rule.phase) for rule in layer.include if rule.HasField("phase")}
    return "/".join(sorted(p for p in phases if p)) or None


def _describe_net(net: caffe_pb2.NetParameter, path: Path, legacy: bool) -> Description:
    return {
        "kind": "net",
        "path": str(path),
        "name": net.name,
        "format": "V1" if legacy else "V2",
        "inputs": list(net.input),
        "input_dims": list(net.input_dim),
        # One shape per input: input_shape, or input_dim in fours (N, C, H, W) as Caffe reads them.
        "input_shapes": ([list(shape.dim) for shape in net.input_shape] if len(net.input_shape)
                         else [list(net.input_dim[i:i + 4]) for i in range(0, len(net.input_dim), 4)]),
        "layers": [
            {
                "name": layer.name,
                "type": layer.type,
                "bottom": list(layer.bottom),
                "top": list(layer.top),
                "phase": _layer_phase(layer),
            }
            for layer in net.layer
        ],
    }


def _describe_solver(solver: caffe_pb2.SolverParameter, path: Path) -> Description:
    fields = json_format.MessageToDict(solver, preserving_proto_field_name=True)
    return {"kind": "solver", "path": str(path), "fields": fields, "text": format_text(solver)}


# --------------------------------------------------------------------------- recognition

_BinaryParser = Tuple[str, Callable[[bytes, Path], Any], Callable[[Any, Path], Description]]
_BINARY_KINDS: List[_BinaryParser] = [
    ("caffemodel", parse_caffemodel, _describe_caffemodel),
    ("solverstate", parse_solverstate, _describe_solverstate),
    ("mean", lambda data, path: _checked_mean(data, path), _describe_mean),
]
#: File suffix → kind, used only to choose which error to report for unrecognised files.
_SUFFIX_KINDS = {
    ".caffemodel": "caffemodel",
    ".solverstate": "solverstate",
    ".binaryproto": "mean",
    ".prototxt": "prototxt",
}


def _checked_mean(data: bytes, path: Path) -> caffe_pb2.BlobProto:
    blob = parse_blob(data, path)
    mean_array(blob, path)
    return blob


def _describe_text(data: bytes, path: Path) -> Tuple[Optional[Description], Optional[FormatError]]:
    """Describe a net or solver prototxt; else (None, the most relevant parse error)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, None
    if "\x00" in text:
        return None, None
    errors = []
    try:
        raw = parse_net_text(text, path, upgrade=False)
        net = upgrade_net(raw, path)
    except FormatError as exc:
        errors.append(exc)
    else:
        if len(net.layer) or len(net.input):
            # A net, whatever its name says; Caffe would refuse it at an unknown layer type.
            check_layer_types(net, path)
            return _describe_net(net, path, legacy=len(raw.layers) > 0), None
        errors.append(FormatError("no layers; expected a Caffe net prototxt", path))
    try:
        solver = parse_solver_text(text, path)
        if solver.ListFields():
            return _describe_solver(solver, path), None
    except FormatError as exc:
        errors.append(exc)
    # Report the net's error for net-looking text, the solver's otherwise.
    looks_like_net = "layer" in text
    return None, errors[0] if looks_like_net or len(errors) == 1 else errors[-1]


def describe(path: PathLike, limit: int = DEFAULT_KEY_LIMIT) -> Description:
    """Recognise ``path`` by its contents and describe it; FormatError when it is none of ours."""
    path = Path(path)
    if path.is_dir():
        detect_backend(path)
        return describe_db(path, limit)
    if not path.exists():
        raise FormatError(f"no such file or directory; {EXPECTED_ANY}", path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FormatError(f"cannot read ({exc.strerror})", path) from exc
    errors: Dict[str, FormatError] = {}
    for kind, parse, describe_kind in _BINARY_KINDS:
        try:
            message = parse(data, path)
        except FormatError as exc:
            errors[kind] = exc
            continue
        return describe_kind(message, path)
    description, text_error = _describe_text(data, path)
    if description is not None:
        return description
    if text_error is not None:
        errors["prototxt"] = text_error
    hinted = _SUFFIX_KINDS.get(path.suffix.lower())
    if hinted in errors:
        raise errors[hinted]
    raise FormatError(f"not a recognised Caffe file; {EXPECTED_ANY}", path)


# --------------------------------------------------------------------------- formatting


def _shape_text(shape) -> str:
    return "x".join(str(d) for d in shape)


def _table(header: List[str], rows: List[List[str]], right: Tuple[int, ...] = ()) -> List[str]:
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = []
    for row in [header] + rows:
        cells = [
            str(cell).rjust(width) if i in right else str(cell).ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_description(info: Description) -> str:
    """Human-readable text of a :func:`describe` result."""
    kind = info["kind"]
    lines: List[str] = []
    if kind == "caffemodel":
        dims = "legacy 4-D blob dims" if info["legacy_blob_dims"] else "blob shapes"
        lines.append(f"caffemodel: {info['path']}")
        lines.append(f"net: {info['name']} ({info['format']} layers, {dims})")
        rows = [
            [layer["name"], layer["type"], ", ".join(_shape_text(s) for s in layer["blobs"]) or "-", f"{layer['params']:,}"]
            for layer in info["layers"]
        ]
        rows.append(["total", "", "", f"{info['total_params']:,}"])
        lines += _table(["layer", "type", "blobs", "params"], rows, right=(3,))
    elif kind == "solverstate":
        lines += [
            f"solverstate: {info['path']}",
            f"iter: {info['iter']}",
            f"learned_net: {info['learned_net']}",
            f"history blobs: {info['history_count']}",
            f"current_step: {info['current_step']}",
        ]
    elif kind == "mean":
        order = info["channel_order"]
        label = f" ({', '.join(order)})" if order else ""
        means = ", ".join(f"{m:.3f}" for m in info["channel_means"])
        lines += [
            f"mean file: {info['path']}",
            f"shape: {_shape_text(info['shape'])} (C x H x W)",
            f"channel means{label}: {means}",
            f"range: {info['min']:.3f} .. {info['max']:.3f}",
        ]
    elif kind == "db":
        return format_db_header(info) + format_db_totals(info)
    elif kind == "net":
        lines.append(f"net prototxt: {info['path']}")
        upgraded = ", upgraded to V2" if info["format"] == "V1" else ""
        lines.append(f"net: {info['name'] or '-'} ({info['format']} syntax{upgraded})")
        if info["inputs"]:
            shapes = info["input_shapes"] + [[]] * (len(info["inputs"]) - len(info["input_shapes"]))
            lines.append("inputs: " + ", ".join(f"{name} {_shape_text(shape) or '?'}"
                                                for name, shape in zip(info["inputs"], shapes)))
        rows = [
            [layer["name"], layer["type"], ",".join(layer["bottom"]) or "-", ",".join(layer["top"]) or "-", layer["phase"] or "all"]
            for layer in info["layers"]
        ]
        lines += _table(["layer", "type", "bottom", "top", "phase"], rows)
    elif kind == "solver":
        lines.append(f"solver prototxt: {info['path']}")
        lines += info["text"].rstrip("\n").splitlines()
    return "\n".join(lines) + "\n"
