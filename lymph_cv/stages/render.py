"""Step 4a: render the per-fold solver, train/test net and deploy net from Jinja2 templates.

For fold K the files go to ``WORKDIR/K/`` under the tutorial's names
(``K-alexnet_solver_ada.prototxt``, ``K-alexnet_traing_32w_db.prototxt``,
``deploy_train32.prototxt``), with paths relative to that folder (``../DB_train_K``…), plus
``render.json`` recording every template variable used.  Values the data decides are derived:
``test_iter`` = lines of ``test_w32_K.txt`` // batch size, the number of classes from the labels
in the fold's lists, the DB backend from ``dbs.json``, the channel count from the mean file.

Modern training (lymph_cv's solver extensions, which real Caffe does not know): ``lr_policy=onecycle``,
``solver_type=AdamW`` and the augmentation variables (``mixup_alpha``, ``label_smoothing``,
``vertical_flip``, ``rotate90``), written as the solver's ``augmentation_param`` only when set, so a
default render stays a solver real Caffe trains.
"""
from __future__ import annotations

import logging
import math
import os

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import jinja2
from lymph_cv.formats.caffe.blob import read_mean
from lymph_cv.formats.caffe.prototxt import parse_net_text, parse_solver_text
from lymph_cv.errors import ConfigError, FormatError, InputError
from lymph_cv.core import faults
from lymph_cv.core.fsutil import atomic_write_json, atomic_write_text, make_dirs
from lymph_cv.core.grid import WINDOW_SIZE
from lymph_cv.core.options import parse_pairs
from lymph_cv.core.resources import prototxt_template_dir
from lymph_cv.net.archs import DEFAULT_ARCH, Arch, get_arch
from lymph_cv.workdir.layout import (DBS_JSON, DEPLOY_NAME, RENDER_JSON, DROPOUT_SNAPSHOT_PREFIX, MANIFEST_NAME,
                                     MEAN_FILE, NET_NAME, SNAPSHOT_PREFIX, SOLVER_NAME, TEST_LIST, TRAIN_LIST)
from lymph_cv.workdir.layout import DB_TEST as TEST_DB
from lymph_cv.workdir.layout import DB_TRAIN as TRAIN_DB
from lymph_cv.workdir.layout import RENDER_JSON
from lymph_cv.workdir.records import DBS, MANIFEST, read_cache, read_record
from lymph_cv.workdir.lists import read_labelled_list, require_folds
from lymph_cv.stages.stage import TUTORIAL_ARCH, PatchPipelineStage, RunOptions

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


#: Snapshot prefixes as the published models are named (…_w32_iter_N, …_w32_dropout_iter_N).

SOLVER_TEMPLATE = "solver.prototxt.j2"
NET_TEMPLATE = "train_net.prototxt.j2"
DEPLOY_TEMPLATE = "deploy.prototxt.j2"

#: --device → solver_mode.
DEVICES = {"cpu": "CPU", "cuda": "GPU"}


def solver_device(device: str) -> str:
    """The solver_mode key of a device option: ``cpu`` → CPU; ``cuda``, ``cuda:N`` and ``auto`` → GPU
    (``caffe train`` / ``lymph-cv train`` then take GPU as "CUDA when available")."""
    return "cpu" if device == "cpu" else "cuda"

#: Solver type string (V2 ``type``) → V1 ``solver_type`` enum name.
SOLVER_TYPES = {"SGD": "SGD", "Nesterov": "NESTEROV", "AdaGrad": "ADAGRAD", "RMSProp": "RMSPROP",
                "AdaDelta": "ADADELTA", "Adam": "ADAM", "AdamW": None}
#: β1 of AdamW when no momentum is set (torch's and fastai's; Caffe's own Adam keeps its 0 default).
ADAMW_MOMENTUM = 0.9
#: lr_policy → the solver fields its formula needs (Caffe's lr policies).
LR_POLICIES = {"fixed": (), "step": ("gamma", "stepsize"), "exp": ("gamma",), "inv": ("gamma", "power"),
               "multistep": ("gamma", "stepvalue"), "poly": ("power",), "sigmoid": ("gamma", "stepsize"),
               "onecycle": ()}
#: Augmentation variables → their "off" value; written into augmentation_param when not off.
AUGMENTATION_FIELDS = {"mixup_alpha": 0.0, "label_smoothing": 0.0, "vertical_flip": False, "rotate90": False,
                       "stain_jitter": False, "stain_scale_sigma": 0.05, "stain_shift_sigma": 0.05}
BACKENDS = {"leveldb": "LEVELDB", "lmdb": "LMDB"}
#: V2 layer type → V1 LayerType enum name, for the legacy syntax.
V1_TYPES = {"Data": "DATA", "Convolution": "CONVOLUTION", "Pooling": "POOLING", "ReLU": "RELU",
            "InnerProduct": "INNER_PRODUCT", "Dropout": "DROPOUT", "Accuracy": "ACCURACY",
            "SoftmaxWithLoss": "SOFTMAX_LOSS", "Softmax": "SOFTMAX"}
#: The deploy net classifies Classifier.predict's 10 oversampled crops in one batch.
DEPLOY_BATCH = 10
#: Image channels when no mean file exists yet to tell (the DBs hold BGR colour patches).
DEFAULT_CHANNELS = 3
DROPOUT_ARCH = "alexnet32w-dropout"
#: Batch size of an architecture that names none (the tutorial's).
DEFAULT_BATCH_SIZE = 128


@dataclass(frozen=True)
class Variable:
    """A template variable settable with ``--set name=value``."""

    parse: Callable[[str], Any]
    default: Any
    help: str


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _finite(text: str) -> float:
    """A finite number (``nan``/``inf`` would render a solver Caffe cannot train with)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


def _at_least(parse: Callable[[str], Any], minimum: float, message: str) -> Callable[[str], Any]:
    """``parse``, then refuse values below ``minimum`` with ``message``."""
    def checked(text: str):
        value = parse(text)
        if value < minimum:
            raise ValueError(message)
        return value

    return checked


_positive_int = _at_least(_integer, 1, "must be a positive integer")
_non_negative_int = _at_least(_integer, 0, "must be >= 0")
_non_negative = _at_least(_finite, 0, "must be >= 0")


def _positive(text: str) -> float:
    """A finite number above 0 (a learning rate: train refuses a solver with base_lr <= 0)."""
    value = _finite(text)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _choice(options: Iterable[str]) -> Callable[[str], str]:
    options = tuple(options)

    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return text

    return parse


def _quoted(text: str) -> str:
    """A value written inside a prototxt string: no quotes, backslashes or line breaks."""
    if not text or any(c in text for c in '"\\\n\r'):
        raise ValueError("must be non-empty, without quotes, backslashes or line breaks")
    return text


def _int_list(text: str) -> List[int]:
    values = [_integer(part) for part in text.split(",") if part.strip()]
    if not values or values != sorted(values) or values[0] < 1:
        raise ValueError("must be increasing positive integers separated by commas")
    return values


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _ratio(text: str) -> float:
    value = _finite(text)
    if not 0.0 <= value < 1.0:
        raise ValueError("must be in [0, 1)")
    return value


#: The solver seed when ``--set random_seed=`` is not given (every random draw of training derives from it).
DEFAULT_SEED = 0
#: Everything ``--set`` may change, with the tutorial's values as defaults (None = derived or unset).
VARIABLES: Dict[str, Variable] = {
    "test_iter": Variable(_positive_int, None, "test batches per test pass (default: test list lines // batch)"),
    "test_interval": Variable(_non_negative_int, 10000, "iterations between tests"),
    "base_lr": Variable(_positive, 0.001, "base learning rate"),
    "lr_policy": Variable(_choice(LR_POLICIES), "fixed", "learning-rate policy"),
    "gamma": Variable(_finite, None, "lr policy gamma"),
    "power": Variable(_finite, None, "lr policy power"),
    "stepsize": Variable(_positive_int, None, "lr policy step size"),
    "stepvalue": Variable(_int_list, None, "multistep iterations, e.g. 1000,5000"),
    "momentum": Variable(_finite, None, "momentum (SGD family)"),
    # Always written: `train --resume` and job scripts then draw what the interrupted run drew.
    "random_seed": Variable(_non_negative_int, DEFAULT_SEED, "solver random seed (init, crops, mirrors, dropout)"),
    "display": Variable(_non_negative_int, 1000, "iterations between log lines"),
    "max_iter": Variable(_positive_int, 600000, "training iterations"),
    "weight_decay": Variable(_finite, 0.004, "L2 weight decay"),
    "snapshot": Variable(_non_negative_int, 10000, "iterations between snapshots"),
    "snapshot_prefix": Variable(_quoted, None, "snapshot file prefix (default K_caffenet_train_w32[_dropout])"),
    "solver_type": Variable(_choice(SOLVER_TYPES), "AdaGrad", "solver"),
    "batch_size": Variable(_positive_int, None, "train and test batch size (default: the architecture's, "
                                                "128 for alexnet32w)"),
    "crop_size": Variable(_positive_int, None, "random/centre crop of the patches (default: patch size - 4 "
                                               "below 64 px, - 8 above; the tutorial's 36 -> 32)"),
    "dropout_ratio": Variable(_ratio, 0.5, "dropout ratio of the dropout variant"),
    "bn_moving_average": Variable(_ratio, 0.999, "BatchNorm moving_average_fraction (Caffe's 0.999; the "
                                                 "residual nets use 0.9, torch's momentum 0.1)"),
    "num_classes": Variable(_positive_int, None, "classes (default: from the list labels)"),
    "backend": Variable(_choice(BACKENDS), None, "database backend (default: dbs.json, else leveldb)"),
    "net_name": Variable(_quoted, "CIFAR10_quick", "net name"),
    "weight_lr_mult": Variable(_finite, 1.0, "lr multiplier of weights"),
    "bias_lr_mult": Variable(_finite, 2.0, "lr multiplier of biases"),
    "mixup_alpha": Variable(_non_negative, 0.0, "mixup Beta(α, α) per sample (0 = off; lymph_cv only)"),
    "label_smoothing": Variable(_ratio, 0.0, "label smoothing ε (lymph_cv only)"),
    "vertical_flip": Variable(_boolean, False, "random vertical flips in training (lymph_cv only)"),
    "rotate90": Variable(_boolean, False, "random quarter turns in training (lymph_cv only)"),
    "stain_jitter": Variable(_boolean, False, "HED stain jitter of training samples (lymph_cv only)"),
    "stain_scale_sigma": Variable(_ratio, 0.05, "stain jitter: scale ~ U(1 - σ, 1 + σ) (lymph_cv only)"),
    "stain_shift_sigma": Variable(_non_negative, 0.05, "stain jitter: shift ~ U(-σ, σ), OD units (lymph_cv only)"),
}
#: Solver fields written only when set, in this order.
OPTIONAL_SOLVER_FIELDS = ("gamma", "power", "stepsize", "stepvalue", "momentum", "random_seed")


@dataclass(frozen=True)
class RenderedFold:
    """The files rendered for one fold."""

    fold: int
    solver: Path
    net: Path
    deploy: Path
    variables: Dict[str, Any]


def parse_overrides(pairs: Iterable[str]) -> Dict[str, str]:
    """``["key=value", ...]`` → dict; ConfigError on a malformed pair."""
    return parse_pairs(pairs, "--set")


def resolve_variables(overrides: Optional[Mapping[str, Any]],
                      defaults: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Defaults (the tutorial's, then ``defaults``, e.g. an architecture's) with ``overrides``
    applied (string values parsed by the variable's type)."""
    values = {name: var.default for name, var in VARIABLES.items()}
    values.update(defaults or {})
    for key, raw in (overrides or {}).items():
        if key not in VARIABLES:
            raise ConfigError(f"--set: unknown template variable {key!r}", valid=sorted(VARIABLES))
        try:
            values[key] = VARIABLES[key].parse(str(raw))
        except ValueError as exc:
            shown = raw if str(raw).isprintable() else repr(str(raw))  # the error stays one line
            raise ConfigError(f"--set {key}={shown}: {exc}") from exc
    return values


def read_list_labels(path: Path) -> List[int]:
    """Labels of a ``<patch file><whitespace><label>`` list, one per non-empty line."""
    return [entry.label for entry in read_labelled_list(path)]


def _backend(workdir: Path) -> str:
    path = workdir / DBS_JSON
    backend = (read_record(path, DBS) or {}).get("backend", "leveldb")
    if backend not in BACKENDS:
        raise FormatError(f"unknown backend {backend!r}", path)
    return backend


def _mean_shape(workdir: Path, fold: int) -> Optional[Tuple[int, int, int]]:
    path = workdir / MEAN_FILE.format(fold=fold)
    if not path.exists():
        return None
    return tuple(int(d) for d in read_mean(path).shape)


def patch_size(workdir: PathLike, fold: int) -> int:
    """The fold's patch size: its mean file's, else the manifest's, else the tutorial's 36."""
    workdir = Path(workdir)
    shape = _mean_shape(workdir, fold)
    if shape is not None:
        return shape[1]
    manifest = workdir / MANIFEST_NAME
    record = read_record(manifest, MANIFEST)
    if record is not None:
        try:
            return int(record["patch_size"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"expected a manifest with an integer 'patch_size' ({exc})", manifest) from None
    return WINDOW_SIZE


def resolve_arch(arch: str = DEFAULT_ARCH, dropout: bool = False) -> Arch:
    """The registry entry for ``--arch`` (``--dropout`` = the tutorial net's dropout variant)."""
    entry = get_arch(arch)
    if dropout and not entry.dropout:
        if entry.name != DEFAULT_ARCH:
            raise ConfigError(f"--dropout is the {DEFAULT_ARCH} dropout variant; not for --arch {arch}")
        entry = get_arch(DROPOUT_ARCH)
    return entry


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(prototxt_template_dir())),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    env.globals["v1_types"] = V1_TYPES
    return env


def _number(value: Any) -> str:
    """Numbers as protobuf text: integral floats without a needless fraction (1 not 1.0)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def fold_context(workdir: PathLike, fold: int, *, dropout: bool = False, legacy_v1: bool = False,
                 overrides: Optional[Mapping[str, Any]] = None, device: str = "cpu",
                 arch: str = DEFAULT_ARCH, stem: Optional[str] = None) -> Dict[str, Any]:
    """Every template variable for ``fold``: defaults, the architecture's, derived values, then
    ``overrides``.  Crop and batch size follow the patches and the architecture (``arch``)."""
    workdir = Path(workdir)
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}", valid=sorted(DEVICES))
    entry = resolve_arch(arch, dropout)
    dropout = entry.dropout
    if legacy_v1 and entry.macro != "trunk":
        raise ConfigError(f"--legacy-v1: the V1 syntax has no layer types for {entry.name}; use V2")
    values = resolve_variables(overrides, entry.defaults)
    size = patch_size(workdir, fold)
    if values["crop_size"] is None:
        values["crop_size"] = entry.crop_for(size)
    if values["crop_size"] > size:
        raise ConfigError(f"crop_size {values['crop_size']} exceeds the {size}x{size} patches")
    if values["batch_size"] is None:
        values["batch_size"] = DEFAULT_BATCH_SIZE
    chosen_stem = entry.stem_for(size, stem)
    test_list = workdir / TEST_LIST.format(fold=fold)
    test_labels = read_list_labels(test_list)
    train_labels = read_list_labels(workdir / TRAIN_LIST.format(fold=fold))
    labels = test_labels + train_labels
    if values["test_iter"] is None:
        if len(test_labels) < values["batch_size"]:
            log.warning("%s: %d lines, fewer than one batch of %d; test_iter set to 1",
                        test_list, len(test_labels), values["batch_size"])
        values["test_iter"] = max(1, len(test_labels) // values["batch_size"])
    if values["num_classes"] is None:
        if not labels or min(labels) < 0:
            raise InputError("lists need non-negative integer labels", test_list)
        values["num_classes"] = max(labels) + 1
    if values["backend"] is None:
        values["backend"] = _backend(workdir)
    if values["snapshot_prefix"] is None:
        values["snapshot_prefix"] = (DROPOUT_SNAPSHOT_PREFIX if dropout else SNAPSHOT_PREFIX).format(fold=fold)
    needed = [key for key in LR_POLICIES[values["lr_policy"]] if values[key] is None]
    if needed:
        raise ConfigError(f"lr_policy {values['lr_policy']} needs --set " + ", ".join(f"{key}=..." for key in needed))
    if values["solver_type"] == "AdaGrad" and values["momentum"]:
        raise ConfigError("AdaGrad takes no momentum (Caffe requires momentum 0)")
    if values["solver_type"] == "AdamW":
        if legacy_v1:
            raise ConfigError("solver_type AdamW has no V1 solver_type enum (it is lymph_cv's); drop --legacy-v1")
        if values["momentum"] is None:
            values["momentum"] = ADAMW_MOMENTUM
    mean_shape = _mean_shape(workdir, fold)
    values.update(
        arch=entry.name, stem=chosen_stem, patch_size=size,
        fold=fold, dropout=dropout, legacy_v1=legacy_v1, device=device,
        solver_mode=DEVICES[device], solver_enum=SOLVER_TYPES[values["solver_type"]],
        net_file=NET_NAME.format(fold=fold),
        mean_file=f"../{MEAN_FILE.format(fold=fold)}",
        deploy_shape=[DEPLOY_BATCH, mean_shape[0] if mean_shape else DEFAULT_CHANNELS,
                      values["crop_size"], values["crop_size"]],
    )
    return values


def render_fold(workdir: PathLike, fold: int, *, dropout: bool = False, legacy_v1: bool = False,
                overrides: Optional[Mapping[str, Any]] = None, device: str = "cpu",
                arch: str = DEFAULT_ARCH, stem: Optional[str] = None) -> RenderedFold:
    """Render fold ``fold``'s solver, train/test net and deploy net into ``WORKDIR/fold/``."""
    workdir = Path(workdir)
    values = fold_context(workdir, fold, dropout=dropout, legacy_v1=legacy_v1, overrides=overrides,
                          device=device, arch=arch, stem=stem)
    context = _net_context(values)
    context["backend"] = BACKENDS[values["backend"]]
    context["optional_solver_fields"] = [
        (key, _number(value)) for key in OPTIONAL_SOLVER_FIELDS if values[key] is not None
        for value in (values[key] if isinstance(values[key], list) else [values[key]])]
    context["augmentation"] = [
        (key, str(values[key]).lower() if isinstance(values[key], bool) else _number(values[key]))
        for key, off in AUGMENTATION_FIELDS.items() if values[key] != off]
    context["data_layers"] = [
        {"name": "cifar_train", "source": f"../{TRAIN_DB.format(fold=fold)}", "mirror": True, "phase": "TRAIN"},
        {"name": "cifar_test", "source": f"../{TEST_DB.format(fold=fold)}", "mirror": False, "phase": "TEST"},
    ]
    env = _environment()
    out_dir = workdir / str(fold)
    make_dirs(out_dir)
    files = {
        "solver": (out_dir / SOLVER_NAME.format(fold=fold), SOLVER_TEMPLATE, parse_solver_text),
        "net": (out_dir / NET_NAME.format(fold=fold), NET_TEMPLATE, parse_net_text),
        "deploy": (out_dir / DEPLOY_NAME, DEPLOY_TEMPLATE, parse_net_text),
    }
    texts = {}
    for key, (path, template, parse) in files.items():
        texts[key] = env.get_template(template).render(context)
        parse(texts[key], path)  # every file must read back with our schema before any is written
    for key, (path, _template, _parse) in files.items():
        atomic_write_text(path, texts[key])
    record = {key: values[key] for key in sorted(values)}
    atomic_write_json(out_dir / RENDER_JSON, record)
    log.debug("fold %d: rendered %s", fold, ", ".join(p.name for p, _t, _p in files.values()))
    return RenderedFold(fold, files["solver"][0], files["net"][0], files["deploy"][0], record)


def _net_context(values: Mapping[str, Any]) -> Dict[str, Any]:
    """The net templates' context of resolved ``values``: the architecture's plan, macro, head blob
    and the numbers as protobuf text."""
    entry = get_arch(values["arch"])
    context = dict(values)
    context.update(entry.plan(values["num_classes"], values["stem"]))
    context["arch_macro"], context["head_blob"] = entry.macro, entry.head
    for key in ("base_lr", "weight_decay", "dropout_ratio", "weight_lr_mult", "bias_lr_mult", "bn_moving_average"):
        context[key] = _number(values[key])
    return context


def render_deploy_text(arch: str, num_classes: int, size: int, *, channels: int = DEFAULT_CHANNELS,
                       stem: Optional[str] = None, batch: int = DEPLOY_BATCH, net_name: Optional[str] = None) -> str:
    """The deploy net of ``arch`` for ``size``×``size`` inputs without a work directory (the MIL
    instance encoder's): the architecture's defaults, read back with our schema."""
    entry = get_arch(arch)
    if size < entry.min_input:
        raise ConfigError(f"architecture {entry.name!r} needs inputs of at least {entry.min_input} pixels, not {size}")
    values = resolve_variables(None, entry.defaults)
    values.update(arch=entry.name, stem=entry.stem_for(size, stem), num_classes=num_classes, dropout=entry.dropout,
                  legacy_v1=False, deploy_shape=[batch, channels, size, size])
    if net_name is not None:
        values["net_name"] = net_name
    text = _environment().get_template(DEPLOY_TEMPLATE).render(_net_context(values))
    parse_net_text(text)
    return text


def render_folds(workdir: PathLike, folds: Optional[Sequence[int]] = None, **options) -> List[RenderedFold]:
    """Render every fold (default: each K with its two lists); options as :func:`render_fold`."""
    present = require_folds(workdir)
    if folds is None:
        folds = present
    missing = [k for k in folds if k not in present]
    if missing:
        raise InputError(f"no test_w32_K.txt for fold(s) {', '.join(map(str, missing))} (a fold needs its "
                         f"train_w32_K.txt and test_w32_K.txt)", Path(workdir))
    rendered = []
    for fold in folds:
        rendered.append(render_fold(workdir, fold, **options))
        faults.event("render:fold")
    return rendered


def describe_variables() -> List[Tuple[str, Any, str]]:
    """(name, default, help) of every ``--set`` variable, for the command's help."""
    return [(name, var.default, var.help) for name, var in VARIABLES.items()]


def training_overrides(o: RunOptions) -> Dict[str, str]:
    """``run``'s template variables: ``--max-iter`` scales the schedule, ``--set`` wins."""
    values: Dict[str, str] = {"random_seed": str(o.seed)}
    if o.max_iter is not None:
        values["max_iter"] = str(o.max_iter)
        # Test at the start and the end only, snapshot four times (so an interrupted run resumes
        # close to where it stopped), and log twenty times: the tutorial's cadence scaled down.
        values["test_interval"] = str(o.max_iter)
        values["snapshot"] = str(max(1, o.max_iter // 4))
        values["display"] = str(max(1, o.max_iter // 20))
    values.update(o.overrides)
    return values


#: Variables that change when training logs, tests and snapshots, never its weights (they are among
#: ``stages.train.RESULT_NEUTRAL_FIELDS``): not part of the render stage's key.
DISPLAY_ONLY = ("display", "test_interval", "snapshot")


class RenderStage(PatchPipelineStage):
    """Step 4a: each fold's solver, train/test net and deploy net.

    The :data:`DISPLAY_ONLY` variables stay out of the key: changing one re-renders the configs (the
    rendered values are checked in ``complete``) under the same key: the later stages resume and find
    their work done (nothing is trained or evaluated again).
    """

    name = "render"
    reads = (TEST_LIST, TRAIN_LIST, MEAN_FILE, DBS_JSON)
    writes = (f"{{fold}}/{SOLVER_NAME}", f"{{fold}}/{NET_NAME}", f"{{fold}}/{DEPLOY_NAME}", f"{{fold}}/{RENDER_JSON}")
    per_fold = True

    def check(self, o: RunOptions) -> None:
        resolve_variables(training_overrides(o))  # --set KEY=VALUE: known keys, values of their type

    def params(self, o: RunOptions) -> dict:
        overrides = {k: v for k, v in training_overrides(o).items() if k not in DISPLAY_ONLY}
        params = {"overrides": overrides, "dropout": o.dropout, "folds": o.fold_list, "device": solver_device(o.device)}
        # Only when not the tutorial's net, so the keys of earlier runs stay valid.
        params.update({k: v for k, v in (("arch", o.arch), ("stem", o.stem)) if v not in (None, TUTORIAL_ARCH)})
        return params

    def complete(self, o: RunOptions) -> bool:
        w = Path(o.workdir)
        if not all((w / str(k) / name.format(fold=k)).is_file()
                   for k in o.fold_list for name in (SOLVER_NAME, NET_NAME, DEPLOY_NAME)):
            return False
        values = resolve_variables(training_overrides(o), resolve_arch(o.arch, o.dropout).defaults)
        wanted = {name: values[name] for name in DISPLAY_ONLY}
        for k in o.fold_list:
            rendered = read_cache(w / str(k) / RENDER_JSON) or {}
            if {name: rendered.get(name) for name in DISPLAY_ONLY} != wanted:
                return False  # rendered with other display values: render again (same key)
        return True

    def run(self, o: RunOptions, fresh: bool) -> None:
        render_folds(o.workdir, o.fold_list, dropout=o.dropout, overrides=training_overrides(o),
                     device=solver_device(o.device), arch=o.arch, stem=o.stem)


STAGE = RenderStage()
