"""Option types shared by the commands, so that one meaning takes one type everywhere."""
from __future__ import annotations

import click
from click.shell_completion import CompletionItem

from lymph_cv.core.devices import DEVICE_CHOICES, DEVICE_HELP


class DeviceType(click.ParamType):
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``, checked when parsed (whether the machine has the
    device is checked where it is used, without importing torch here)."""

    name = "device"

    def convert(self, value, param, ctx):
        text = str(value).strip().lower()
        if text in DEVICE_CHOICES or (text.startswith("cuda:") and text[5:].isdigit()):
            return text
        self.fail(f"expected one of {', '.join(DEVICE_HELP)}, got {value!r}", param, ctx)

    def get_metavar(self, param, ctx=None) -> str:  # click < 8.2 passes no ctx
        return "[" + "|".join(DEVICE_HELP) + "]"

    def shell_complete(self, ctx, param, incomplete):
        return [CompletionItem(choice) for choice in DEVICE_CHOICES if choice.startswith(incomplete)]


DEVICE = DeviceType()
#: Processes for a stage: 0 (or not given) means one per core.
WORKERS = click.IntRange(min=0)
