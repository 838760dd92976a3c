"""The ``lymph-cv`` command: a Click group with one thin subcommand per stage.

Subcommands live in ``lymph_cv.commands.*`` and are imported only when used, so
``lymph-cv inspect`` does not pay for importing torch.  Library errors
(:class:`lymph_cv.errors.LymphCVError`) become one line on stderr and exit status 2.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import re
import signal
import sys
from pathlib import Path
from typing import Callable, ContextManager, Dict, Iterator, Optional, Sequence

import click

from lymph_cv import __version__
from lymph_cv.errors import LymphCVError, Terminated, interrupt_status
from lymph_cv.core.threads import configure_openmp, keep_freed_memory
from lymph_cv.workdir.layout import EVAL_DIR, EVAL_FOLD_DIR

#: command name → "module:attribute" of its click command.
COMMANDS = {
    "synth": "lymph_cv.commands.data:synth",
    "patches": "lymph_cv.commands.data:patches",
    "folds": "lymph_cv.commands.data:folds",
    "bags": "lymph_cv.commands.bags:bags",
    "dbs": "lymph_cv.commands.data:dbs",
    "render": "lymph_cv.commands.render:render",
    "train": "lymph_cv.commands.train:train",
    "submit": "lymph_cv.commands.jobs:submit",
    "jobs": "lymph_cv.commands.jobs:jobs",
    "evaluate": "lymph_cv.commands.evaluate:evaluate",
    "report": "lymph_cv.commands.evaluate:report",
    "plot-log": "lymph_cv.commands.plot_log:plot_log",
    "export": "lymph_cv.commands.export:export",
    "import": "lymph_cv.commands.import_data:import_group",
    "heldout": "lymph_cv.commands.heldout:heldout",
    "run": "lymph_cv.commands.run:run",
    "inspect": "lymph_cv.commands.inspect:inspect",
    "stain": "lymph_cv.commands.stain:stain",
    "slides": "lymph_cv.commands.slides:slides",
    "mil": "lymph_cv.commands.mil:mil",
    "pycaffe-path": "lymph_cv.commands.pycaffe_path:pycaffe_path",
}

#: command name → its one-line summary, shown by ``lymph-cv --help`` without importing the command
#: (that import would load torch, cv2 and the stages: seconds instead of ~0.1 s).  A command
#: missing here is imported for its summary; tests/test_fast_paths.py keeps both in step (add a new command to both).
SUMMARIES = {
    "synth": "Write a synthetic CLL/FL/MCL data set in the real layout to OUT.",
    "patches": "Step 1: rotated patches of every image of DATA/<class>/ into OUT (with manifest.json).",
    "folds": "Step 2: `folds MANIFEST OUT` writes the k-fold lists; `folds check DIR` looks for leaks.",
    "bags": "MIL bags: `bags make SOURCE WORKDIR` writes bags.json; `bags split WORKDIR` the patient-level splits.",
    "dbs": "Step 3: DB_train_K, DB_test_K and DB_train_w32_K.binaryproto for every fold of WORKDIR.",
    "render": "Render WORKDIR/K/ solver, net and deploy prototxt for every fold.",
    "train": "Train SOLVER's net; snapshots and train.log go to the solver's base directory.",
    "submit": "Write one job script per fold next to its configs and submit it; record jobs in WORKDIR/jobs.json.",
    "jobs": "Show each recorded job's id, scheduler, state and log path.",
    "evaluate": ("Step 5: label every test image of fold K by voting over its windows; write metrics, "
                 "matrices and PNGs to WORKDIR/eval/fold_K."),
    "report": ("Pool every evaluated fold of WORKDIR: matrix, per-fold mean ± sd, per-class metrics, "
               "eval/report.md, report.json, report.txt and confusion.png."),
    "run": "Steps 1–5 and the report: images → patches → folds → DBs → training → confusion matrices.",
    "plot-log": ("Plot train/test loss, test accuracy and learning rate of one or more `caffe train` logs "
                 "(ours or Caffe's own), overlaid."),
    "export": "Export MODEL.caffemodel with its DEPLOY.prototxt to ONNX (batch size free), checked in onnxruntime.",
    "heldout": ("Accuracy, ROC AUC (curve in roc.png, operating threshold) and confusion of a fold's net on "
                "DB_heldout_K (eval/heldout_K/metrics.json)."),
    "import": "Import a published data set into a work directory (`import pcam DIR WORKDIR`).",
    "stain": "Stain normalisation: `stain fit` makes a target, `stain apply` normalises a folder.",
    "slides": ("Whole-slide images: `slides info SLIDE`, `slides tissue SLIDE`, `slides tile DATA OUT` (tissue tiles), "
               "`slides evaluate WORKDIR -k K` (fold K's test slides labelled by their tiles)."),
    "mil": ("Multiple-instance learning: `mil train WORKDIR` trains and evaluates each bag split, "
            "`mil evaluate WORKDIR` re-evaluates."),
    "inspect": "Describe a caffemodel, solverstate, mean binaryproto, net/solver prototxt or LevelDB/LMDB.",
    "pycaffe-path": "Print the folder holding a `caffe` package for legacy scripts (put it on PYTHONPATH).",
}


@contextlib.contextmanager
def _held_lock(folder: Path, name: Optional[str] = None, sweep: bool = True) -> Iterator[None]:
    # the lock module (json, socket, the file helpers) loads only when a writer runs, not for --help
    from lymph_cv.core import locks

    name = locks.LOCK_NAME if name is None else name
    existed = folder.is_dir()
    try:
        with locks.folder_lock(folder, name=name, sweep=sweep):
            yield
    except BaseException:
        if not existed:  # a command that failed before writing leaves no folder made for its lock
            locks.remove_unused(folder)
        raise


def _lock_folder(key: str, create: bool, params: dict) -> ContextManager:
    folder = Path(params[key])
    if not create and not folder.is_dir():
        return contextlib.nullcontext()  # the command itself says that the folder is missing
    return _held_lock(folder)


def _lock_evaluate(params: dict) -> ContextManager:
    from lymph_cv.core import locks

    out = params.get("out") or Path(params["workdir"]) / EVAL_DIR / EVAL_FOLD_DIR.format(fold=params["fold"])
    # eval/fold_K is replaced as a whole: its lock file lies beside it
    return _held_lock(Path(out).parent, name=locks.target_lock_name(out), sweep=False)


#: Writing commands → the lock each one holds while it runs (from its parsed parameters).  ``train``
#: locks the solver's base directory itself (so does ``tools/caffe train``); readers (inspect, jobs,
#: report) never lock.
WRITERS: Dict[str, Callable[[dict], ContextManager]] = {
    "synth": functools.partial(_lock_folder, "out", True),
    "patches": functools.partial(_lock_folder, "out", True),
    "dbs": functools.partial(_lock_folder, "workdir", False),
    "render": functools.partial(_lock_folder, "workdir", False),
    "submit": functools.partial(_lock_folder, "workdir", False),
    "evaluate": _lock_evaluate,
    "run": functools.partial(_lock_folder, "workdir", True),
}
#: Writers inside a command group (``folds make MANIFEST OUT``).
GROUP_WRITERS: Dict[str, Dict[str, Callable[[dict], ContextManager]]] = {
    "folds": {"make": functools.partial(_lock_folder, "out", True)},
    "bags": {"make": functools.partial(_lock_folder, "workdir", True),
             "split": functools.partial(_lock_folder, "workdir", False)},
    "slides": {"evaluate": _lock_evaluate},
    "mil": {"train": functools.partial(_lock_folder, "workdir", False),
            "evaluate": functools.partial(_lock_folder, "workdir", False)}}
#: Commands that take the lock somewhere inside (they get ``--wait-lock`` too).
SELF_LOCKING = ("train",)


def _set_wait(ctx, param, value: bool) -> None:
    if value:
        from lymph_cv.core import locks

        locks.set_wait(True)


def _wait_option() -> click.Option:
    return click.Option(["--wait-lock"], is_flag=True, expose_value=False, is_eager=True, callback=_set_wait,
                        help="If another lymph-cv writes the same folder, wait for it instead of stopping.")


def _locking(command: click.Command, lock_of: Optional[Callable[[dict], ContextManager]]) -> click.Command:
    """``command`` with ``--wait-lock`` and, when ``lock_of`` is given, its lock held while it runs."""
    if getattr(command, "_lymph_cv_locking", False):
        return command
    command.params.append(_wait_option())
    if lock_of is not None:
        callback = command.callback

        @functools.wraps(callback)
        def locked(*args, **kwargs):
            with lock_of(click.get_current_context().params):
                return callback(*args, **kwargs)

        command.callback = locked
    command._lymph_cv_locking = True
    return command


def _configure_run(root_params: dict) -> None:
    """What a command needs before its body and ``--help`` does not: logging to stderr at the level
    of ``-v``/``-q`` (the logging package alone is ~5 ms of start-up) and freed memory kept."""
    import logging

    verbose, quiet = root_params.get("verbose", 0), root_params.get("quiet", False)
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    # torch's own logging setup runs at the end of its import; a Ctrl-C during that import left its
    # atexit INFO lines ("FakeTensor cache stats: ...") to our handler, after "error: interrupted".
    logging.getLogger("torch").setLevel(logging.WARNING)
    keep_freed_memory()


def _prepared(command: click.Command) -> click.Command:
    """``command`` (each command of a group) calling :func:`_configure_run` first, outside its lock."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _prepared(sub)
        return command
    if getattr(command, "_lymph_cv_prepared", False) or command.callback is None:
        return command
    callback = command.callback

    @functools.wraps(callback)
    def prepared(*args, **kwargs):
        ctx = click.get_current_context(silent=True)  # None: called as a plain function
        _configure_run(ctx.find_root().params if ctx is not None else {})
        return callback(*args, **kwargs)

    command.callback = prepared
    command._lymph_cv_prepared = True
    return command


class UserError(click.ClickException):
    """A library error shown as ``error: <message>`` with exit status 2."""

    exit_code = 2

    def __init__(self, message: str, exit_code: Optional[int] = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    def show(self, file=None) -> None:  # noqa: D401 - click's signature
        click.echo(f"error: {self.format_message()}", err=True)


class Interrupted(UserError):
    """Ctrl-C: ``error: interrupted``, exit status 130 (Click would print ``Aborted!`` and exit 1);
    SIGTERM: ``error: terminated``, 143."""

    exit_code = 130


#: Click's path messages: ``File 'x' does not exist.`` → the file first, then what is wrong.
_PATH_MESSAGE = re.compile(r"^(?:File|Directory|Path) '(?P<path>.*)' (?P<problem>.*?)\.?$", re.S)


def _param_name(exc: click.BadParameter) -> str:
    """The option (its longest name) or argument (its metavar) a parameter error is about."""
    hint = exc.param_hint
    if hint is not None:
        return " / ".join(hint) if isinstance(hint, (list, tuple)) else str(hint).strip("'\"")
    param = exc.param
    if isinstance(param, click.Option):
        return max(param.opts, key=len)
    return param.human_readable_name if param is not None else ""


def usage_line(exc: click.UsageError) -> str:
    """A Click usage error in our form: ``<option or file>: <what was expected>`` (one line)."""
    message = " ".join(exc.format_message().split()) if not isinstance(exc, click.BadParameter) else \
        " ".join(exc.message.split())
    if isinstance(exc, click.MissingParameter):
        kind = exc.param_type or (exc.param.param_type_name if exc.param is not None else "parameter")
        return f"{_param_name(exc)}: required {kind}, not given"
    if isinstance(exc, click.BadParameter):
        name = _param_name(exc)
        path = _PATH_MESSAGE.match(message)
        if path:
            return f"{path.group('path')}: {path.group('problem')} ({name})"
        return f"{name}: {message.rstrip('.')}" if name else message.rstrip(".")
    if isinstance(exc, click.NoSuchOption):
        did_you_mean = f" (did you mean {', '.join(sorted(exc.possibilities))}?)" if exc.possibilities else ""
        return f"{exc.option_name}: no such option{did_you_mean}"
    if isinstance(exc, click.BadOptionUsage):
        return f"{exc.option_name}: {exc.message.rstrip('.')}"
    command = exc.ctx.command_path if exc.ctx is not None else "lymph-cv"
    return f"{message.rstrip('.')} (see '{command} --help')"


def _no_args_help(exc: Exception) -> bool:
    # click >= 8.2 shows a group's help through a UsageError subclass: keep that as it is.
    return type(exc).__name__ == "NoArgsIsHelpError"


def _interrupted(exc: BaseException) -> Interrupted:
    return Interrupted("terminated" if isinstance(exc, Terminated) else "interrupted", interrupt_status(exc))


def _terminate(signum, _frame) -> None:
    raise Terminated()


def _available(name: str) -> bool:
    module = COMMANDS[name].split(":")[0]
    return importlib.util.find_spec(module) is not None


class LazyGroup(click.Group):
    """Imports a subcommand's module on first use; turns library errors into :class:`UserError`."""

    def list_commands(self, ctx):
        return sorted(name for name in COMMANDS if _available(name))

    def get_command(self, ctx, name):
        if name not in COMMANDS or not _available(name):
            return None
        module, attribute = COMMANDS[name].split(":")
        command = getattr(importlib.import_module(module), attribute)
        if isinstance(command, click.Group):
            for sub, lock_of in GROUP_WRITERS.get(name, {}).items():
                if sub in command.commands:
                    _locking(command.commands[sub], lock_of)
        elif name in WRITERS or name in SELF_LOCKING:
            _locking(command, WRITERS.get(name))
        return _prepared(command)

    def format_commands(self, ctx, formatter):
        """The command table from :data:`SUMMARIES`; only commands missing there are imported."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            summary = SUMMARIES.get(name)
            if summary is None:
                rows.append((name, self.get_command(ctx, name).get_short_help_str(limit)))
            else:
                rows.append((name, click.Command(name, help=summary).get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            if _no_args_help(exc):
                raise
            raise UserError(usage_line(exc)) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            if _no_args_help(exc):
                raise
            raise UserError(usage_line(exc)) from None
        except LymphCVError as exc:
            raise UserError(str(exc), exc.exit_status) from exc
        except KeyboardInterrupt as exc:
            raise _interrupted(exc) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lymph-cv")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Janowczyk's lymphoma sub-type tutorial, end to end, Caffe-compatible."""
    # -v/-q take effect when the command runs (_configure_run), not for a subcommand's --help


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``lymph-cv``; ``argv`` defaults to ``sys.argv[1:]``."""
    # Before any subcommand imports torch: every stage may run the net (see lymph_cv.core.threads).
    configure_openmp(keep_memory=False)
    # SIGTERM unwinds like Ctrl-C (temporaries removed, locks released) and exits 143.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="lymph-cv")
    except KeyboardInterrupt as exc:
        error = _interrupted(exc)
        error.show()
        sys.exit(error.exit_code)
    finally:
        signal.signal(signal.SIGTERM, previous)
