"""Caffe text files (``.prototxt``): parse and print nets and solvers, upgrade V1 nets.

Parsing uses protobuf's ``text_format`` (which accepts Caffe's ``True``/``False``).  Legacy
(V1) nets, such as the tutorial's, are upgraded in memory the way Caffe does on load: the
``layers`` become ``layer`` with string types, ``blobs_lr``/``weight_decay`` become
``param { lr_mult decay_mult }``, include/exclude rules are kept, and the legacy transform
fields of ``data_param`` move to ``transform_param``.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Optional, Union

from google.protobuf import text_format

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.files import read_text
from lymph_cv.errors import FormatError

PathLike = Union[str, os.PathLike]
NET_EXPECTED = "expected a Caffe net prototxt (NetParameter in text format)"
SOLVER_EXPECTED = "expected a Caffe solver prototxt (SolverParameter in text format)"

_V1 = caffe_pb2.V1LayerParameter
#: V1 layer type enum → V2 type string (Caffe's UpgradeV1LayerType).
V1_TYPE_NAMES = {
    _V1.NONE: "",
    _V1.ABSVAL: "AbsVal",
    _V1.ACCURACY: "Accuracy",
    _V1.ARGMAX: "ArgMax",
    _V1.BNLL: "BNLL",
    _V1.CONCAT: "Concat",
    _V1.CONTRASTIVE_LOSS: "ContrastiveLoss",
    _V1.CONVOLUTION: "Convolution",
    _V1.DECONVOLUTION: "Deconvolution",
    _V1.DATA: "Data",
    _V1.DROPOUT: "Dropout",
    _V1.DUMMY_DATA: "DummyData",
    _V1.EUCLIDEAN_LOSS: "EuclideanLoss",
    _V1.ELTWISE: "Eltwise",
    _V1.EXP: "Exp",
    _V1.FLATTEN: "Flatten",
    _V1.HDF5_DATA: "HDF5Data",
    _V1.HDF5_OUTPUT: "HDF5Output",
    _V1.HINGE_LOSS: "HingeLoss",
    _V1.IM2COL: "Im2col",
    _V1.IMAGE_DATA: "ImageData",
    _V1.INFOGAIN_LOSS: "InfogainLoss",
    _V1.INNER_PRODUCT: "InnerProduct",
    _V1.LRN: "LRN",
    _V1.MEMORY_DATA: "MemoryData",
    _V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss",
    _V1.MVN: "MVN",
    _V1.POOLING: "Pooling",
    _V1.POWER: "Power",
    _V1.RELU: "ReLU",
    _V1.SIGMOID: "Sigmoid",
    _V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss",
    _V1.SILENCE: "Silence",
    _V1.SOFTMAX: "Softmax",
    _V1.SOFTMAX_LOSS: "SoftmaxWithLoss",
    _V1.SPLIT: "Split",
    _V1.SLICE: "Slice",
    _V1.TANH: "TanH",
    _V1.WINDOW_DATA: "WindowData",
    _V1.THRESHOLD: "Threshold",
}
#: Every layer type BVLC Caffe registers (REGISTER_LAYER_CLASS / REGISTER_LAYER_CREATOR in
#: src/caffe/layers/*.cpp and layer_factory.cpp, master 9b89154); Caffe refuses any other type
#: ("Unknown layer type").
CAFFE_LAYER_TYPES = (
    "AbsVal", "Accuracy", "ArgMax", "BNLL", "BatchNorm", "BatchReindex", "Bias", "Clip", "Concat",
    "ContrastiveLoss", "Convolution", "Crop", "Data", "Deconvolution", "Dropout", "DummyData", "ELU",
    "Eltwise", "Embed", "EuclideanLoss", "Exp", "Filter", "Flatten", "HDF5Data", "HDF5Output",
    "HingeLoss", "Im2col", "ImageData", "InfogainLoss", "InnerProduct", "Input", "LRN", "LSTM",
    "LSTMUnit", "Log", "MVN", "MemoryData", "MultinomialLogisticLoss", "PReLU", "Parameter", "Pooling",
    "Power", "Python", "RNN", "ReLU", "Reduction", "Reshape", "SPP", "Scale", "Sigmoid",
    "SigmoidCrossEntropyLoss", "Silence", "Slice", "Softmax", "SoftmaxWithLoss", "Split", "Swish",
    "TanH", "Threshold", "Tile", "WindowData",
)
#: Legacy ``solver_type`` enum → the ``type`` string current Caffe selects solvers by.
SOLVER_TYPE_NAMES = {
    caffe_pb2.SolverParameter.SGD: "SGD",
    caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
    caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad",
    caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
    caffe_pb2.SolverParameter.ADADELTA: "AdaDelta",
    caffe_pb2.SolverParameter.ADAM: "Adam",
}
#: Layer types whose ``data_param`` may carry legacy transformation fields.
DATA_LAYER_TYPES = ("Data", "ImageData", "WindowData")
#: data_param field → transform_param field, moved by the upgrade.
LEGACY_TRANSFORM_FIELDS = {"scale": "scale", "mean_file": "mean_file", "crop_size": "crop_size", "mirror": "mirror"}
#: V1 layer fields that are not copied one-to-one into the V2 layer.
_V1_SPECIAL_FIELDS = {"type", "param", "blob_share_mode", "blobs_lr", "weight_decay"}

_LINE_RE = re.compile(r"^(\d+):(\d+)\s*:\s*")
#: text_format's message for a V1 ``type`` that is not a LayerType value (a name or a number).
_V1_ENUM_RE = re.compile(r'Enum type "caffe\.V1LayerParameter\.LayerType" has no value (?:named|with number) (\S+?)\.?$')


def v1_type_name(value: int) -> str:
    """The V2 type string of a V1 ``LayerType`` enum value."""
    try:
        return V1_TYPE_NAMES[value]
    except KeyError as exc:
        raise FormatError(f"unknown V1 layer type {value}") from exc


def _parse_text(text: str, message, path: Optional[PathLike], expected: str):
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        line, column = exc.GetLine(), exc.GetColumn()
        detail = _LINE_RE.sub("", str(exc))
        where = f"line {line}, column {column}: " if line else ""
        unknown = _V1_ENUM_RE.search(detail) if isinstance(message, caffe_pb2.NetParameter) else None
        if unknown:
            detail = _unknown_v1_type(text, line, column, unknown.group(1))
            raise FormatError(f"{where}{detail}", path) from exc
        raise FormatError(f"{where}{detail.rstrip('.')}; {expected}", path) from exc
    return message


def _unknown_v1_type(text: str, line: int, column: int, token: str) -> str:
    """What is wrong with V1 layer type ``token`` at ``line``/``column``, naming its layer when a
    reparse with NONE in its place finds the one layer that has it."""
    valid = ", ".join(sorted(name for name in _V1.LayerType.keys() if name != "NONE"))
    lines = text.splitlines(keepends=True)
    name = None
    start = column - 1
    if 0 < line <= len(lines) and lines[line - 1][start:].startswith(token):
        lines[line - 1] = lines[line - 1][:start] + "NONE" + lines[line - 1][start + len(token):]
        try:
            net = text_format.Parse("".join(lines), caffe_pb2.NetParameter())
        except text_format.ParseError:
            net = None  # another error further on: the type's layer stays unnamed
        if net is not None:
            marked = [layer.name for layer in net.layers if layer.HasField("type") and layer.type == _V1.NONE]
            name = marked[0] if len(marked) == 1 else None
    layer = f"layer {name!r}" if name is not None else "a layer"
    return f"{layer} has type {token}, not a Caffe V1 layer type (valid: {valid})"


def check_layer_types(net: caffe_pb2.NetParameter, path: Optional[PathLike] = None) -> None:
    """FormatError at the first layer of (V2) ``net`` whose type Caffe does not register."""
    for layer in net.layer:
        if layer.type not in CAFFE_LAYER_TYPES:
            what = f"type {layer.type!r}" if layer.type else "no type"
            raise FormatError(f"layer {layer.name!r} has {what}, not a Caffe layer type "
                              f"(valid: {', '.join(CAFFE_LAYER_TYPES)})", path)


# --------------------------------------------------------------------------- nets


def _move_legacy_transform(layer: caffe_pb2.LayerParameter) -> None:
    """Move data_param's scale/mean_file/crop_size/mirror into transform_param."""
    if not layer.HasField("data_param"):
        return
    for old, new in LEGACY_TRANSFORM_FIELDS.items():
        if layer.data_param.HasField(old):
            setattr(layer.transform_param, new, getattr(layer.data_param, old))
            layer.data_param.ClearField(old)


def _upgrade_v1_layer(v1: caffe_pb2.V1LayerParameter) -> caffe_pb2.LayerParameter:
    layer = caffe_pb2.LayerParameter()
    for field, value in v1.ListFields():
        if field.name in _V1_SPECIAL_FIELDS:
            continue
        target = layer.DESCRIPTOR.fields_by_name.get(field.name)
        if target is None:
            raise FormatError(f"V1 layer {v1.name!r}: field {field.name!r} has no V2 equivalent")
        if field.is_repeated:
            getattr(layer, field.name).extend(value)
        elif field.message_type is not None:
            getattr(layer, field.name).CopyFrom(value)
        else:
            setattr(layer, field.name, value)
    if v1.HasField("type"):
        layer.type = v1_type_name(v1.type)
    # Caffe's order: param names first, then share modes, lr and decay multipliers, each
    # adding ParamSpecs as needed.
    for index, name in enumerate(v1.param):
        _param(layer, index).name = name
    for index, mode in enumerate(v1.blob_share_mode):
        _param(layer, index).share_mode = mode
    for index, rate in enumerate(v1.blobs_lr):
        _param(layer, index).lr_mult = rate
    for index, decay in enumerate(v1.weight_decay):
        _param(layer, index).decay_mult = decay
    return layer


def _param(layer: caffe_pb2.LayerParameter, index: int) -> caffe_pb2.ParamSpec:
    while len(layer.param) <= index:
        layer.param.add()
    return layer.param[index]


def upgrade_net(net: caffe_pb2.NetParameter, path: Optional[PathLike] = None) -> caffe_pb2.NetParameter:
    """A V2 copy of ``net``: V1 ``layers`` upgraded, legacy data transform fields moved."""
    if len(net.layer) and len(net.layers):
        raise FormatError("has both 'layer' and legacy 'layers' fields; use one of them", path)
    upgraded = caffe_pb2.NetParameter()
    upgraded.CopyFrom(net)
    if len(net.layers):
        del upgraded.layers[:]
        for v1 in net.layers:
            try:
                upgraded.layer.append(_upgrade_v1_layer(v1))
            except FormatError as exc:
                raise FormatError(exc.detail, path) from exc
    for layer in upgraded.layer:
        if layer.type in DATA_LAYER_TYPES:
            _move_legacy_transform(layer)
    return upgraded


def parse_net_text(text: str, path: Optional[PathLike] = None, upgrade: bool = True) -> caffe_pb2.NetParameter:
    """Parse net prototxt text and (unless ``upgrade`` is false) upgrade it to V2."""
    net = _parse_text(text, caffe_pb2.NetParameter(), path, NET_EXPECTED)
    return upgrade_net(net, path) if upgrade else net


def read_net_prototxt(path: PathLike) -> caffe_pb2.NetParameter:
    """Read a net ``.prototxt`` (V1 or V2) as a V2 NetParameter."""
    return parse_net_text(read_text(path, NET_EXPECTED), path)


def _rule_met(rule: caffe_pb2.NetStateRule, phase: int, level: int, stages: Iterable[str]) -> bool:
    stages = set(stages)
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    if any(stage not in stages for stage in rule.stage):
        return False
    return not any(stage in stages for stage in rule.not_stage)


def filter_net(
    net: caffe_pb2.NetParameter, phase: int, level: int = 0, stages: Iterable[str] = ()
) -> caffe_pb2.NetParameter:
    """The layers of ``net`` that Caffe instantiates in ``phase`` (include/exclude rules).

    No rules → included; include rules → included iff any is met; exclude rules →
    excluded iff any is met.  The returned net's ``state`` records phase, level and stages.
    """
    net = upgrade_net(net) if len(net.layers) else net
    stages = tuple(stages)
    filtered = caffe_pb2.NetParameter()
    filtered.CopyFrom(net)
    del filtered.layer[:]
    filtered.state.phase = phase
    filtered.state.level = level
    del filtered.state.stage[:]
    filtered.state.stage.extend(stages)
    for layer in net.layer:
        if len(layer.include) and len(layer.exclude):
            raise FormatError(f"layer {layer.name!r}: specify either include rules or exclude rules, not both")
        if len(layer.include):
            included = any(_rule_met(rule, phase, level, stages) for rule in layer.include)
        else:
            included = not any(_rule_met(rule, phase, level, stages) for rule in layer.exclude)
        if included:
            filtered.layer.add().CopyFrom(layer)
    return filtered


# --------------------------------------------------------------------------- solvers


def upgrade_solver(solver: caffe_pb2.SolverParameter, path: Optional[PathLike] = None) -> caffe_pb2.SolverParameter:
    """Map the legacy ``solver_type`` enum to the ``type`` string (in place); both set is an error."""
    if solver.HasField("solver_type"):
        if solver.HasField("type"):
            raise FormatError("sets both 'solver_type' and 'type'; use only 'type'", path)
        solver.type = SOLVER_TYPE_NAMES[solver.solver_type]
        solver.ClearField("solver_type")
    return solver


def parse_solver_text(text: str, path: Optional[PathLike] = None) -> caffe_pb2.SolverParameter:
    """Parse solver prototxt text; ``solver_type`` becomes ``type``."""
    solver = _parse_text(text, caffe_pb2.SolverParameter(), path, SOLVER_EXPECTED)
    return upgrade_solver(solver, path)


def read_solver(path: PathLike) -> caffe_pb2.SolverParameter:
    """Read a solver ``.prototxt``; ``solver_type`` becomes the ``type`` string."""
    return parse_solver_text(read_text(path, SOLVER_EXPECTED), path)


# --------------------------------------------------------------------------- printing


def format_text(message) -> str:
    """A message in prototxt text format (Caffe's layout: two-space indent, one field a line)."""
    return text_format.MessageToString(message)


def write_prototxt(path: PathLike, message) -> None:
    """Write a message as a ``.prototxt`` atomically."""
    from lymph_cv.core.fsutil import atomic_write_text

    atomic_write_text(path, format_text(message))
