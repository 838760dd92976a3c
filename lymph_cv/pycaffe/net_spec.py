"""``caffe.NetSpec``, ``caffe.layers`` (``L``) and ``caffe.params`` (``P``): nets written in Python.

``L.Convolution(bottom, kernel_size=3, num_output=8)`` makes a :class:`Top` of a :class:`Function`
(one layer); ``ntop=`` gives several tops (a tuple; 0 gives the Function itself), ``in_place=True``
reuses the bottoms as tops, ``name=``/``top=`` are LayerParameter fields like any other.  Keyword
arguments go into the layer type's own parameter message when it has that field (``num_output`` →
``convolution_param``), else into the LayerParameter; names ending in ``param`` always go to the
LayerParameter.  Lists become repeated fields, dicts messages, a single value of a repeated field a
one-element list.  Unnamed tops and layers are called ``<Type><n>``.  ``to_proto()`` gives a
NetParameter; ``str()`` of it is the text prototxt Caffe and :mod:`lymph_cv.formats.caffe.prototxt`
read.
"""
from __future__ import annotations

import functools
from collections import Counter, OrderedDict
from typing import Dict, Iterable, Optional

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from lymph_cv.errors import ConfigError
from lymph_cv.formats.caffe import caffe_pb2

#: Layer types whose parameters live in another type's message.
SHARED_PARAMS = {"Deconvolution": "convolution_param"}
PARAM_SUFFIX = "_param"
MESSAGE_SUFFIX = "Parameter"


class NetSpecError(ConfigError, AttributeError):
    """A keyword that is no field of the layer's parameters (pycaffe raises AttributeError)."""


@functools.lru_cache(maxsize=None)
def _param_fields() -> Dict[str, str]:
    """Layer type → its parameter field of LayerParameter (``Pooling`` → ``pooling_param``)."""
    fields = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith(PARAM_SUFFIX) and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith(MESSAGE_SUFFIX):
                fields[type_name[:-len(MESSAGE_SUFFIX)]] = field.name
    fields.update(SHARED_PARAMS)
    return fields


def _repeated(field: FieldDescriptor) -> bool:
    # protobuf 6+ has is_repeated (and dropped label); older releases only label
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == FieldDescriptor.LABEL_REPEATED


def _assign(message: Message, name: str, value) -> None:
    """Set field ``name`` of ``message`` from a Python value (see the module docstring)."""
    field = message.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
        raise NetSpecError(f"{message.DESCRIPTOR.name} has no field {name!r}")
    is_message = field.type == FieldDescriptor.TYPE_MESSAGE
    if _repeated(field):
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        target = getattr(message, name)
        for item in values:
            if is_message:
                _fill(target.add(), item)
            else:
                target.append(item)
    elif is_message:
        _fill(getattr(message, name), value)
    else:
        setattr(message, name, value)


def _fill(message: Message, value) -> None:
    if isinstance(value, Message):
        message.CopyFrom(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _assign(message, key, item)
    else:
        raise NetSpecError(f"{message.DESCRIPTOR.name} needs a dict or message, got {type(value).__name__}")


class Top:
    """One output blob of a :class:`Function` (its ``n``-th top)."""

    def __init__(self, fn: "Function", n: int):
        self.fn = fn
        self.n = n

    def to_proto(self) -> caffe_pb2.NetParameter:
        """The NetParameter of every layer this top depends on."""
        return to_proto(self)


class Function:
    """One layer: its type, input Tops and keyword parameters (``params``)."""

    def __init__(self, type_name: str, inputs: Iterable, params: dict):
        inputs = tuple(inputs)
        for index, item in enumerate(inputs):
            if not isinstance(item, Top):
                raise TypeError(f"{type_name} input {index} is not a Top (type is {type(item)})")
        self.type_name = type_name
        self.inputs = inputs
        self.params = dict(params)
        self.ntop = int(self.params.pop("ntop", 1))
        self.in_place = bool(self.params.pop("in_place", False))
        self.tops = tuple(Top(self, n) for n in range(self.ntop))


class _Writer:
    """Turns Functions into LayerParameters in dependency order, naming what the user did not."""

    def __init__(self, names: Optional[dict] = None):
        self.names = dict(names or {})
        self.counts: Counter = Counter()
        self.layers: "OrderedDict[Function, caffe_pb2.LayerParameter]" = OrderedDict()

    def _auto(self, key, type_name: str) -> str:
        if key not in self.names:
            self.counts[type_name] += 1
            self.names[key] = f"{type_name}{self.counts[type_name]}"
        return self.names[key]

    def write(self, fn: Function) -> None:
        if fn in self.layers:
            return
        bottoms = []
        for top in fn.inputs:
            self.write(top.fn)
            bottoms.append(self.layers[top.fn].top[top.n])
        layer = caffe_pb2.LayerParameter(type=fn.type_name)
        layer.bottom.extend(bottoms)
        if fn.in_place:
            layer.top.extend(bottoms)
        else:
            layer.top.extend(self._auto(top, fn.type_name) for top in fn.tops)
        layer.name = self._auto(fn.tops[0], fn.type_name) if fn.tops else self._auto(fn, fn.type_name)
        own = _param_fields().get(fn.type_name)
        for key, value in fn.params.items():
            inner = getattr(layer, own) if own and not key.endswith("param") else None
            if inner is not None and key in inner.DESCRIPTOR.fields_by_name:
                _assign(inner, key, value)
            else:
                _assign(layer, key, value)
        self.layers[fn] = layer

    def net(self) -> caffe_pb2.NetParameter:
        net = caffe_pb2.NetParameter()
        net.layer.extend(self.layers.values())
        return net


def to_proto(*tops: Top) -> caffe_pb2.NetParameter:
    """The NetParameter of every layer needed to compute ``tops`` (automatic names)."""
    writer = _Writer()
    for top in tops:
        writer.write(top.fn)
    return writer.net()


class NetSpec:
    """Named tops (assign ``n.conv1 = L.Convolution(...)``); ``to_proto`` uses those names."""

    def __init__(self):
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name: str, value) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str):
        try:
            return self.__dict__["tops"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, key: str, value) -> None:
        self.tops[key] = value

    def __getitem__(self, key: str):
        return self.tops[key]

    def to_proto(self) -> caffe_pb2.NetParameter:
        writer = _Writer({value: name for name, value in self.tops.items()})
        for value in self.tops.values():
            writer.write(value.fn if isinstance(value, Top) else value)
        return writer.net()


class Layers:
    """``L.<Type>(*bottoms, **params)``: a Top, a tuple of Tops (``ntop`` > 1) or the Function (0)."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("__"):
            raise AttributeError(type_name)

        def make(*inputs, **params):
            fn = Function(type_name, inputs, params)
            if fn.ntop == 0:
                return fn
            return fn.tops[0] if fn.ntop == 1 else fn.tops

        return make


class _Constants:
    def __init__(self, message_name: str):
        self._message = getattr(caffe_pb2, message_name)

    def __getattr__(self, name: str):
        return getattr(self._message, name)


class Parameters:
    """``P.<Type>.<CONSTANT>``: enum values of ``<Type>Parameter`` (``P.Pooling.MAX``)."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("__"):
            raise AttributeError(type_name)
        return _Constants(type_name + MESSAGE_SUFFIX)


layers = Layers()
params = Parameters()
