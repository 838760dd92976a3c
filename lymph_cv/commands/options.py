"""Option types and callbacks shared by the commands, so that one meaning takes one type everywhere (each
callback wraps the library's one parser)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import click

from lymph_cv.core.devices import DEVICE_CHOICES, DEVICE_HELP
from lymph_cv.core.options import parse_fold_spec, parse_pairs
from lymph_cv.errors import ConfigError
from lymph_cv.workdir.layout import parse_class_names


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
        from click.shell_completion import CompletionItem  # completion only, not every start-up

        return [CompletionItem(choice) for choice in DEVICE_CHOICES if choice.startswith(incomplete)]


DEVICE = DeviceType()
#: Processes for a stage: 0 (or not given) means one per core.
WORKERS = click.IntRange(min=0)


def _callback(parse: Callable, none_passes: bool = True) -> Callable:
    def callback(ctx: click.Context, param: click.Parameter, value):
        if value is None and none_passes:
            return None
        try:
            return parse(value)
        except ConfigError as exc:
            raise click.BadParameter(exc.detail, ctx=ctx, param=param) from None
    return callback


#: ``--folds 1-5`` / ``1,3`` → sorted fold numbers (None when not given).
folds_option = _callback(parse_fold_spec)
#: ``--classes CLL,FL,MCL`` → the class names in label order (None when not given).
classes_option = _callback(parse_class_names)


def pairs_option(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> Optional[dict]:
    """Repeated ``--set KEY=VALUE`` → dict (a bad pair's error names the option once, as Click spells it)."""
    return _callback(lambda pairs: parse_pairs(pairs, option=""))(ctx, param, values)
