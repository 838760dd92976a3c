"""A plain deploy net's forward pass with its convolution prefix native: bfloat16 on Intel AMX or
AVX512-BF16 (AMD Zen 4 and later), or float32 on AVX-512 or AVX2 + FMA; no torch.

:class:`AMXForward` runs the leading run of Convolution, Pooling (MAX, AVE) and plain ReLU layers of
a :class:`lymph_cv.net.plain.PlainNet` in :mod:`lymph_cv.net.amxconv` (``make native``), one crop
at a time per thread with every blob in L2, and the rest of the net (InnerProduct, Softmax, …) in
float32 through :meth:`PlainNet.forward`.  bfloat16 (AMX, or VDPBF16PS on the same tiles) is lymph_cv.net.bf16's arithmetic
(oneDNN's): crops, weights and blobs bfloat16, products accumulated in float32, the bias added in
float32.  So its results differ from float32 by bfloat16's 8-bit significand, and
lymph_cv.stages.evaluate rechecks close windows in float32 as it does for the torch bfloat16 path.
``precision="float32"`` runs the same prefix in float32 (FMA; the sums in another order than
torch's, so equal to float rounding; the AVX-512 and AVX2 kernels give the same bits), faster than
torch's float32 on 2 cores (benchmarks/bench_eval.py).

A ReLU folds into the layer before it when it reads that layer's top and nothing after it reads
the blob before the ReLU.  The prefix ends at the first other layer; a prefix without a
convolution, or whose intermediate blobs a later layer reads, is :class:`UnsupportedNet`.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from lymph_cv.core.native import native_enabled
from lymph_cv.core.threads import set_blas_threads, usable_cores
from lymph_cv.net.plain import PlainNet, UnsupportedNet

#: amxconv's layer kinds.
KINDS = {"Convolution": 0, "MAX": 1, "AVE": 2}
#: The layer types the native prefix holds.
PREFIX_TYPES = ("Convolution", "Pooling", "ReLU")


def native_module():
    """:mod:`lymph_cv.net.amxconv`, or None when it is not built or ``LYMPH_CV_NATIVE=0``."""
    if not native_enabled():
        return None
    try:
        from lymph_cv.net import amxconv
    except ImportError:  # an optional build that failed: the callers take another path
        return None
    return amxconv


def available() -> bool:
    """Whether :class:`AMXForward` can run bfloat16 here: the extension is built and enabled, and the
    CPU has AMX-BF16 (with the kernel granting the tile state) or AVX512-BF16."""
    module = native_module()
    return module is not None and bool(module.available())


def available_float32() -> bool:
    """Whether :class:`AMXForward` can run float32 here (the extension, AVX-512 F/BW/VL or AVX2 + FMA)."""
    module = native_module()
    return module is not None and bool(module.available_f32())


def available_precisions() -> Tuple[str, ...]:
    """The precisions :class:`AMXForward` runs in this process (of :data:`PRECISIONS`)."""
    return tuple(p for p, ok in (("bfloat16", available()), ("float32", available_float32())) if ok)


def prefix_ops(net: PlainNet) -> Tuple[List[tuple], int, str]:
    """(amxconv ops, index in ``net.layers`` of the first layer after the prefix, the prefix's top)."""
    ops: List[tuple] = []
    blob = net.input
    index = 0
    made: List[str] = []
    while index < len(net.layers):
        layer = net.layers[index]
        if layer.type not in PREFIX_TYPES or layer.bottoms != [blob]:
            break
        if layer.type == "ReLU":
            if layer.params["slope"] or not ops:
                break
            ops[-1] = (ops[-1][0], 1) + ops[-1][2:]
        else:
            n, c, h, w = net.blob_shapes[blob]
            _, oc, oh, ow = net.blob_shapes[layer.tops[0]]
            (kh, kw), (sh, sw), (ph, pw) = layer.params["kernel"], layer.params["stride"], layer.params["pad"]
            if layer.type == "Convolution":
                if sh != sw or ph != pw:
                    break
                weights = layer.blobs[0]
                bias = layer.blobs[1].reshape(-1) if layer.params["bias_term"] else None
                ops.append((KINDS["Convolution"], 0, c, h, w, ph, oc, oh, ow, kh, kw, sh, sw, 0, 0,
                            np.ascontiguousarray(weights, dtype=np.float32),
                            None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)))
            else:
                ops.append((KINDS[layer.params["method"]], 0, c, h, w, 0, oc, oh, ow, kh, kw, sh, sw, ph, pw, None, None))
        blob = layer.tops[0]
        made.append(blob)
        index += 1
    if not any(op[0] == KINDS["Convolution"] for op in ops):
        raise UnsupportedNet(f"net {net.name!r}: no convolution leads the net (nothing for AMX)")
    # the float32 rest starts from the prefix's top alone
    hidden = (set(made) | {net.input}) - {blob}
    read = hidden & {bottom for layer in net.layers[index:] for bottom in layer.bottoms}
    if read:
        raise UnsupportedNet(f"net {net.name!r}: later layers read {', '.join(sorted(read))}, blobs inside the "
                             f"convolution prefix")
    return ops, index, blob


#: The arithmetics :meth:`AMXForward.forward` offers.
PRECISIONS = ("bfloat16", "float32")


class AMXForward:
    """``net``'s forward pass with its convolution prefix native (module docstring)."""

    def __init__(self, net: PlainNet, threads: Optional[int] = None):
        module = native_module()
        if module is None or not module.available_f32():
            raise UnsupportedNet("no native engine here (CPU, kernel, `make native` or LYMPH_CV_NATIVE=0)")
        self.net = net
        self._ops, self.end, self.top = prefix_ops(net)
        self._module = module
        #: What :meth:`forward` computes in: bfloat16 where AMX or AVX512-BF16 is, float32 everywhere it runs.
        self.precisions = available_precisions()
        self._programs = {"bfloat16": module.program(self._ops)} if "bfloat16" in self.precisions else {}
        self.threads = threads or usable_cores()
        # The rest's matrices are small (a batch × an inner product): OpenBLAS's idle threads would
        # spin beside the engine's own and take a third of its CPU (measured with perf).
        set_blas_threads(1)
        _, c, h, w = net.blob_shapes[net.input]
        _, oc, oh, ow = net.blob_shapes[self.top]
        self.crop_shape = (c, h, w)
        self.top_shape = (oh, ow, oc)  # channels-last, as amxconv writes it
        #: The blobs :meth:`forward` can return: the prefix's top and what the float32 rest makes.
        self.rest_blobs = frozenset({self.top} | {top for layer in net.layers[self.end:] for top in layer.tops})

    @property
    def layer_names(self) -> List[str]:
        """The layers that run natively."""
        return [layer.name for layer in self.net.layers[: self.end]]

    def _program(self, precision: str):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r} (expected one of {', '.join(PRECISIONS)})")
        if precision not in self.precisions:
            raise UnsupportedNet(f"no native {precision} on this CPU (it runs {', '.join(self.precisions)})")
        if precision not in self._programs:
            self._programs[precision] = self._module.program(self._ops, precision == "float32")
        return self._programs[precision]

    def forward(self, crops: np.ndarray, blobs=(), precision: Optional[str] = None) -> dict:
        """The first output and the named ``blobs`` after the prefix, float32, for N×C×H×W crops,
        the prefix computed in ``precision`` (default: the first of :attr:`precisions`)."""
        crops = np.ascontiguousarray(crops, dtype=np.float32)
        if crops.ndim != 4 or tuple(crops.shape[1:]) != self.crop_shape:
            raise ValueError(f"crops of shape {crops.shape}, the net takes N×{'×'.join(map(str, self.crop_shape))}")
        program = self._program(precision or self.precisions[0])
        if not len(crops):
            return {name: np.zeros((0,) + tuple(self.net.blob_shapes[name][1:]), np.float32)
                    for name in (self.net.output, *blobs)}
        n = crops.shape[0]
        top = np.empty((n,) + self.top_shape, dtype=np.float32)
        self._module.run(program, crops, n, top, self.threads)
        # an N×C×H×W view of channels-last memory, as PlainNet's own blobs are
        return self.net.forward({self.top: top.transpose(0, 3, 1, 2)}, start=self.end, blobs=blobs)

    def predict(self, crops: np.ndarray, precision: Optional[str] = None) -> np.ndarray:
        """(N, classes) float32 values of the first output for N×C×H×W float32 crops."""
        out = self.forward(crops, precision=precision)[self.net.output]
        return out.reshape(len(out), int(np.prod(out.shape[1:])))
