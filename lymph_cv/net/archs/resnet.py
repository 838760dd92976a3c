"""ResNet-18/34 (basic blocks) and ResNet-50 (bottlenecks) as Caffe layers.

Every convolution is followed by BatchNorm + Scale in place (Kaiming He's published Caffe nets);
names follow his prototxts: conv1/bn_conv1/scale_conv1, res2a_branch2a/bn2a_branch2a/…, res2a
(Eltwise SUM) and res2a_relu, pool5 (global average) and the class scores ``fc``.  The bottleneck
strides its 3x3 convolution (ResNet v1.5, as torchvision), the projection shortcut is 1x1 + BN.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from lymph_cv.net.archs.registry import STEMS, Arch, register_arch

STAGE_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4
#: Solver settings of residual nets that differ from the tutorial's AdaGrad.
#: BatchNorm's moving average: Caffe's 0.999 weighs a short run's first, very different
#: iterations almost as much as its last (a ResNet-18 trained 50 iterations tested at chance).
DEFAULTS = {"solver_type": "SGD", "base_lr": 0.05, "momentum": 0.9, "weight_decay": 0.0001,
            "bn_moving_average": 0.9}
BATCH_SIZES = {"resnet18": 64, "resnet34": 64, "resnet50": 32}
#: Smallest crop: four stride-2 stages after the stem leave at least 1x1.
MIN_INPUT = 8


def _conv(name: str, bottom: str, num_output: int, kernel: int, stride: int, relu: bool) -> Dict[str, Any]:
    """A convolution + BatchNorm + Scale (+ ReLU) unit, all in place on the convolution's top."""
    suffix = name[len("res"):] if name.startswith("res") else "_" + name
    return {"kind": "conv_bn", "name": name, "bottom": bottom, "num_output": num_output, "kernel": kernel,
            "stride": stride, "pad": kernel // 2, "bn": "bn" + suffix, "scale": "scale" + suffix,
            "relu": name + "_relu" if relu else None}


def _block_names(count: int) -> List[str]:
    return [chr(ord("a") + i) for i in range(count)]


def resnet_plan(depths: Sequence[int], bottleneck: bool, num_classes: int, stem: Optional[str]) -> Dict[str, Any]:
    """The layer plan the ``resnet`` macro renders: conv_bn units, sums, pools and the fc head."""
    if stem not in STEMS:
        raise ValueError(f"stem {stem!r} not in {STEMS}")
    plan: List[Dict[str, Any]] = []
    if stem == "imagenet":
        plan.append(_conv("conv1", "data", STAGE_WIDTHS[0], 7, 2, relu=True))
        plan.append({"kind": "pool", "name": "pool1", "bottom": "conv1", "kernel": 3, "stride": 2})
        bottom = "pool1"
    else:
        plan.append(_conv("conv1", "data", STAGE_WIDTHS[0], 3, 1, relu=True))
        bottom = "conv1"
    channels = STAGE_WIDTHS[0]
    for stage, (width, count) in enumerate(zip(STAGE_WIDTHS, depths)):
        out = width * (BOTTLENECK_EXPANSION if bottleneck else 1)
        for index, letter in enumerate(_block_names(count)):
            block = f"res{stage + 2}{letter}"
            stride = 2 if stage > 0 and index == 0 else 1
            if stride != 1 or channels != out:
                plan.append(_conv(f"{block}_branch1", bottom, out, 1, stride, relu=False))
                shortcut = f"{block}_branch1"
            else:
                shortcut = bottom
            if bottleneck:
                plan.append(_conv(f"{block}_branch2a", bottom, width, 1, 1, relu=True))
                plan.append(_conv(f"{block}_branch2b", f"{block}_branch2a", width, 3, stride, relu=True))
                plan.append(_conv(f"{block}_branch2c", f"{block}_branch2b", out, 1, 1, relu=False))
                last = f"{block}_branch2c"
            else:
                plan.append(_conv(f"{block}_branch2a", bottom, width, 3, stride, relu=True))
                plan.append(_conv(f"{block}_branch2b", f"{block}_branch2a", width, 3, 1, relu=False))
                last = f"{block}_branch2b"
            plan.append({"kind": "sum", "name": block, "bottoms": [shortcut, last], "relu": block + "_relu"})
            bottom, channels = block, out
    plan.append({"kind": "global_pool", "name": "pool5", "bottom": bottom})
    plan.append({"kind": "fc", "name": "fc", "bottom": "pool5", "num_output": num_classes})
    return {"arch_plan": plan}


def _entry(name: str, depths: Sequence[int], bottleneck: bool, description: str) -> Arch:
    return Arch(name, macro="resnet", head="fc",
                plan=lambda num_classes, stem: resnet_plan(depths, bottleneck, num_classes, stem),
                stems=STEMS, min_input=MIN_INPUT,
                defaults=dict(DEFAULTS, batch_size=BATCH_SIZES[name]), description=description)


@register_arch
def resnet18() -> Arch:
    return _entry("resnet18", (2, 2, 2, 2), False, "ResNet-18, basic blocks")


@register_arch
def resnet34() -> Arch:
    return _entry("resnet34", (3, 4, 6, 3), False, "ResNet-34, basic blocks")


@register_arch
def resnet50() -> Arch:
    return _entry("resnet50", (3, 4, 6, 3), True, "ResNet-50, bottleneck blocks")
