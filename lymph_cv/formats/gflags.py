"""Command lines the way Google gflags (Caffe's flag library) reads them.

Flags may appear anywhere among the positional arguments, with one or two dashes:
``-flag value``, ``--flag value``, ``-flag=value``, ``--flag=value``.  Boolean flags are set by
``-flag`` and cleared by ``-noflag``; they take a value only with ``=`` (``-shuffle=false``).
``--`` ends the flags.  Unknown flags and bad values are errors, as in gflags.
"""
from __future__ import annotations

from collections import namedtuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING unimported: typing is ~5 ms of the tools' start-up (issue 17)
if TYPE_CHECKING:
    from typing import Any, Callable, Mapping, Optional, Sequence

from lymph_cv.errors import ConfigError

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


class HelpRequested(Exception):
    """``-help`` / ``--help`` was given: the caller prints its usage."""


class Flag(namedtuple("Flag", ("type", "default", "help"), defaults=("",))):
    """A flag's ``type`` (bool, int, float or str), ``default`` and one-line ``help`` (a named tuple
    from collections, not typing's NamedTuple nor a dataclass: typing and inspect cost every tool's start-up)."""

    __slots__ = ()

    @property
    def is_bool(self) -> bool:
        return self.type is bool


def _type_name(flag: Flag) -> str:
    return {bool: "bool", int: "int32", float: "double", str: "string"}.get(flag.type, "value")


def _convert(name: str, flag: Flag, text: str) -> Any:
    if flag.is_bool:
        lowered = text.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    else:
        try:
            value = flag.type(text)
            if flag.type is not int or -2**31 <= value < 2**31:  # int32, as gflags checks
                return value
        except ValueError:
            pass
    raise ConfigError(f"illegal value '{text}' specified for {_type_name(flag)} flag '{name}'")


def parse(argv: Sequence[str], flags: Mapping[str, Flag]) -> tuple[dict[str, Any], list[str]]:
    """Split ``argv`` into flag values (defaults filled in) and positional arguments.

    Raises ConfigError for an unknown flag, a missing value or a value of the wrong type,
    and HelpRequested for ``-help``.
    """
    values = {name: flag.default for name, flag in flags.items()}
    positional: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            positional.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        body = arg[2:] if arg.startswith("--") else arg[1:]
        name, has_value, text = body.partition("=")
        if name in ("help", "helpfull", "h") and not has_value:
            raise HelpRequested()
        flag = flags.get(name)
        if flag is None and name.startswith("no") and not has_value and flags.get(name[2:], Flag(str, None)).is_bool:
            values[name[2:]] = False
            continue
        if flag is None:
            raise ConfigError(f"unknown command line flag '{name}'", valid=[f"-{n}" for n in flags])
        if has_value:
            values[name] = _convert(name, flag, text)
        elif flag.is_bool:
            values[name] = True
        elif i < len(args):
            values[name] = _convert(name, flag, args[i])
            i += 1
        else:
            raise ConfigError(f"flag '-{name}' is missing its argument")
    return values, positional


def usage(program: str, synopsis: str, flags: Mapping[str, Flag]) -> str:
    """A gflags-like usage text: the synopsis, then one line per flag with its default."""
    lines = [f"{program}: {synopsis}", "", "  Flags:"]
    for name, flag in flags.items():
        default = str(flag.default).lower() if flag.is_bool else repr(flag.default) if flag.type is str else flag.default
        lines.append(f"    -{name} ({flag.help}) type: {_type_name(flag)} default: {default}")
    return "\n".join(lines)


def run_tool(
    run: Callable[[dict[str, Any], list[str]], int],
    argv: Optional[Sequence[str]],
    program: str,
    synopsis: str,
    flags: Mapping[str, Flag],
) -> int:
    """Main of a drop-in Caffe tool: parse ``argv`` (default ``sys.argv[1:]``), call ``run(values, positional)``.

    INFO log lines reach stderr as with Caffe's tools; ``-help`` prints the usage; a library
    error becomes one ``error: …`` line and exit status 2.
    """
    import signal
    import threading

    from lymph_cv.errors import Terminated

    def terminate(signum, _frame):
        raise Terminated()

    main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM unwinds like Ctrl-C: temporaries removed, exit 143.
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    try:
        return _run_tool(run, argv, program, synopsis, flags)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run_tool(run, argv, program: str, synopsis: str, flags) -> int:
    import logging
    import sys

    from lymph_cv.errors import LymphCVError, Terminated, interrupt_status

    argv = sys.argv[1:] if argv is None else list(argv)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(message)s", stream=sys.stderr)
    root.setLevel(logging.INFO)  # Caffe's tools log INFO lines to stderr
    try:
        values, positional = parse(argv, flags)
        return run(values, positional)
    except HelpRequested:
        try:
            print(usage(program, synopsis, flags), flush=True)
        except BrokenPipeError:  # `-help | head`: the reader left, as with any Unix tool
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except LymphCVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt as exc:
        print("error: terminated" if isinstance(exc, Terminated) else "error: interrupted", file=sys.stderr)
        return interrupt_status(exc)
