"""The tutorial's 32w net (conv-pool x3, two inner products), plain and with dropout."""
from __future__ import annotations

from lymph_cv.net.archs.registry import Arch, register_arch

#: The tutorial's batch size.
BATCH_SIZE = 128
#: Smallest crop the three stride-2 poolings keep at least 1x1 (ceil rounding).
MIN_INPUT = 3


def _plan(num_classes, stem):
    return {}


@register_arch
def alexnet32w() -> Arch:
    return Arch("alexnet32w", macro="trunk", head="ip2", plan=_plan, min_input=MIN_INPUT,
                defaults={"batch_size": BATCH_SIZE}, description="the tutorial's 32w net (default)")


@register_arch
def alexnet32w_dropout() -> Arch:
    return Arch("alexnet32w-dropout", macro="trunk", head="ip2", plan=_plan, min_input=MIN_INPUT, dropout=True,
                defaults={"batch_size": BATCH_SIZE}, description="32w with relu+dropout after ip1 and ip2")
