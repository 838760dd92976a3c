"""Training a MIL model on bags, and the files it is stored as.

A trained model is a folder: ``encoder.caffemodel`` (the instance encoder, a Caffe model of the
architecture's deploy net ``deploy.prototxt``, which ``lymph-cv evaluate`` and pycaffe load with
``mean.binaryproto``), ``mil_head.caffemodel`` (head, clinical MLP, fusion layer: see
:mod:`lymph_cv.net.mil.storage`) and ``mil.json`` (the resolved configuration, classes, clinical
attribute names, seed and the training history).

A training stopped by SIGINT/SIGTERM saves the model so far with ``complete: false``, where it stopped
(``mil.json``'s ``resume``: epoch, next batch, the epoch's bag order, its losses so far, the random
generators' states) and Adam's moments (``resume.solverstate``, a Caffe SolverState: exp_avg,
exp_avg_sq per parameter).  A rerun with the same configuration goes on from there, and ends with
the weights an uninterrupted training gives.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from lymph_cv.core import faults
from lymph_cv.core.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text, make_dirs
from lymph_cv.errors import ConfigError, FormatError, Interrupted, signal_name
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.blob import array_to_blob, read_mean
from lymph_cv.formats.caffe.model import (history_arrays, read_caffemodel, read_solverstate, set_history,
                                          write_caffemodel, write_solverstate)
from lymph_cv.formats.caffe.prototxt import parse_net_text
from lymph_cv.net.archs import get_arch
from lymph_cv.net.build import build_net
from lymph_cv.net.mil import HeadConfig, build_head, get_method, parse_k
from lymph_cv.net.mil.clinical import FUSIONS, ClinicalMLP
from lymph_cv.net.mil.model import MILModel, encode, pad_bags
from lymph_cv.net.mil.storage import load_modules, write_modules
from lymph_cv.stages.mil.data import BagData, image_mean, stack_clinical, to_tensor
from lymph_cv.stages.render import render_deploy_text
from lymph_cv.stages.train import ACTION_STOP, signal_actions
from lymph_cv.workdir.records import RecordSpec, read_record

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
ENCODER_MODEL = "encoder.caffemodel"
ENCODER_DEPLOY = "deploy.prototxt"
ENCODER_MEAN = "mean.binaryproto"
HEAD_MODEL = "mil_head.caffemodel"
CONFIG_JSON = "mil.json"
#: Adam's moments at a stop (only while ``mil.json`` says ``complete: false``).
RESUME_STATE = "resume.solverstate"
MODEL_FILES = (ENCODER_MODEL, ENCODER_DEPLOY, ENCODER_MEAN, HEAD_MODEL, CONFIG_JSON)
MIL_RECORD = RecordSpec(CONFIG_JSON, "the MIL model record", "not a mil.json written by `lymph-cv mil train`",
                        fields={"config": dict, "classes": list, "history": list})
#: How a --mil-set value of each setting type is described in its error.
KIND_WORDS = {int: "an integer", float: "a number", str: "text", bool: "true or false"}
#: The fault point after each training batch (the fault suite stops a training there).
BATCH_EVENT = "mil:batch"
#: Seeds of the training draws derive from the run seed by stream.
STREAM_INIT, STREAM_ORDER = 1, 2


@dataclass(frozen=True)
class MILConfig:
    """Everything a MIL training depends on (saved as ``mil.json``'s ``config``)."""

    method: str = "attention"
    arch: str = "alexnet32w"
    #: centre crop of the instances, the encoder's input (the seed's 112 for ResNet-18)
    crop: int = 32
    epochs: int = 20
    bags_per_batch: int = 4
    #: instances per bag forwarded with gradients through the trunk (the rest under no_grad)
    grad_instances: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    k_train: str = "5"
    k_agg: str = "5"
    attention_dim: int = 64
    fusion: Optional[str] = None
    #: train the classifier, head and MLP on cached features of a fixed trunk
    frozen: bool = False
    mirror: bool = True
    seed: int = 0
    #: instances per no_grad forward
    chunk: int = 256

    def check(self) -> None:
        get_method(self.method)
        get_arch(self.arch)
        parse_k(self.k_train, "--k-train")
        parse_k(self.k_agg, "--k-agg")
        if self.fusion is not None and self.fusion not in FUSIONS:
            raise ConfigError(f"--fusion {self.fusion!r}", valid=FUSIONS)
        for name in ("crop", "epochs", "bags_per_batch", "grad_instances", "attention_dim", "chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected at least 1")
        if not self.lr > 0:
            raise ConfigError(f"--lr {self.lr}: expected a positive learning rate")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_pairs(cls, pairs: dict, **given) -> "MILConfig":
        """A configuration from ``given`` fields and ``key=value`` text pairs (``--mil-set``), each
        parsed by its field's type; ConfigError naming an unknown key or a bad value."""
        defaults = cls()
        values = dict(given)
        for key, raw in pairs.items():
            if key not in defaults.to_json() or key in given:
                raise ConfigError(f"--mil-set: unknown MIL setting {key!r}",
                                  valid=sorted(set(defaults.to_json()) - set(given)))
            kind = type(getattr(defaults, key))
            try:
                if kind is bool:
                    if str(raw).lower() not in ("true", "false", "1", "0"):
                        raise ValueError(raw)
                    values[key] = str(raw).lower() in ("true", "1")
                else:
                    values[key] = kind(raw) if getattr(defaults, key) is not None else str(raw)
            except ValueError:
                raise ConfigError(f"--mil-set {key}={raw}: expected {KIND_WORDS.get(kind, kind.__name__)}") from None
        config = cls(**values)
        config.check()
        return config

    @classmethod
    def from_json(cls, record: dict, path: Optional[PathLike] = None) -> "MILConfig":
        try:
            return cls(**record)
        except TypeError as exc:
            raise FormatError(f"expected a MIL configuration ({exc})", path) from None


@dataclass
class Progress:
    """Where a stopped training is: enough to go on exactly as if it had not stopped."""

    epoch: int  #: the epoch to go on with (0-based)
    next_batch: int  #: the position in ``order`` of its next batch's first bag
    order: List[int]  #: its bag order ([] when it has not started)
    losses: List[float]  #: its batches' losses so far
    instances: int
    seconds: float
    generator: bytes  #: the bag order, flip and subset generator's state
    torch_rng: bytes  #: torch's global generator (dropout)
    steps: dict  #: parameter index → Adam's step count
    moments: List[np.ndarray]  #: exp_avg, exp_avg_sq of each parameter in ``steps`` (ascending index)

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "next_batch": self.next_batch, "order": self.order, "losses": self.losses,
                "instances": self.instances, "seconds": round(self.seconds, 3), "generator": self.generator.hex(),
                "torch_rng": self.torch_rng.hex(), "steps": {str(k): v for k, v in self.steps.items()},
                "state": RESUME_STATE}


@dataclass
class MILTrained:
    """A trained (or loaded) model with what describes it."""

    model: MILModel
    config: MILConfig
    classes: List[str]
    clinical_names: Optional[List[str]]
    mean: np.ndarray
    net_param: caffe_pb2.NetParameter
    history: List[dict] = field(default_factory=list)
    stopped: Optional[int] = None
    #: where a stopped training is (None once complete)
    progress: Optional[Progress] = None


def _seed(seed: int, stream: int) -> int:
    return (int(seed) * 1_000_003 + stream) % (2 ** 63)


def build_model(config: MILConfig, n_classes: int, n_clinical: Optional[int], phase: int = caffe_pb2.TRAIN
                ) -> tuple[MILModel, caffe_pb2.NetParameter]:
    """An untrained model (the encoder filled by its fillers from the seed)."""
    config.check()
    arch = get_arch(config.arch)
    net_param = parse_net_text(render_deploy_text(config.arch, n_classes, config.crop, net_name=f"mil_{config.arch}"))
    encoder = build_net(net_param, phase)
    generator = torch.Generator().manual_seed(_seed(config.seed, STREAM_INIT))
    encoder.init_params(generator)
    classifier = encoder.layer(arch.head)
    feature_blob = next(layer.bottom[0] for layer in net_param.layer if layer.name == arch.head)
    features = classifier.blobs[0].shape[0 if classifier.transpose else 1]
    head_config = HeadConfig(features=int(features), classes=n_classes, k_train=parse_k(config.k_train, "--k-train"),
                             k_agg=parse_k(config.k_agg, "--k-agg"), attention_dim=config.attention_dim)
    torch.manual_seed(_seed(config.seed, STREAM_INIT))  # the head's and MLP's torch initialisers
    head = build_head(config.method, head_config)
    clinical = ClinicalMLP(n_clinical, n_classes) if n_clinical else None
    if clinical is not None and config.fusion is None:
        raise ConfigError("clinical attributes given: choose --fusion concat, sum or late")
    if clinical is None and config.fusion is not None:
        raise ConfigError(f"--fusion {config.fusion}: no clinical attributes (give --clinical)")
    return MILModel(encoder, arch.head, feature_blob, config.method, head, clinical, config.fusion), net_param


def clinical_statistics(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median, mean and sd (missing values, NaN, filled with the median first) of (bags, attributes)."""
    median = np.nanmedian(values, axis=0)
    if np.isnan(median).any():
        raise ConfigError("a clinical attribute has no value in any training bag")
    filled = np.where(np.isnan(values), median, values)
    sd = filled.std(axis=0)
    return median, filled.mean(axis=0), np.where(sd > 0, sd, 1.0)


def _trainable(model: MILModel, frozen: bool) -> List[torch.nn.Parameter]:
    classifier = model.encoder.layer(model.classifier)
    if frozen:
        params = list(classifier.blobs)
    else:
        params = [entry.param for entry in model.encoder.learnable]
    others = [p for name, m in model.stored_modules().items() for p in m.parameters()]
    return [p for p in params if p.requires_grad] + others


def _progress(optimiser: torch.optim.Optimizer, generator: torch.Generator, epoch: int, next_batch: int,
              order: List[int], losses: List[float], instances: int, seconds: float) -> Progress:
    state = optimiser.state_dict()["state"]
    steps, moments = {}, []
    for index in sorted(state):
        entry = state[index]
        steps[int(index)] = int(float(entry["step"]))
        moments += [entry["exp_avg"].detach().cpu().numpy().astype(np.float32),
                    entry["exp_avg_sq"].detach().cpu().numpy().astype(np.float32)]
    return Progress(epoch, next_batch, list(order), list(losses), instances, seconds,
                    bytes(generator.get_state().numpy()), bytes(torch.get_rng_state().numpy()), steps, moments)


def _restore(progress: Progress, optimiser: torch.optim.Optimizer, generator: torch.Generator,
             params: Sequence[torch.nn.Parameter]) -> None:
    saved = optimiser.state_dict()
    state = {}
    for n, index in enumerate(sorted(progress.steps)):
        device = params[index].device
        state[index] = {"step": torch.tensor(float(progress.steps[index])),
                        "exp_avg": torch.from_numpy(progress.moments[2 * n]).reshape(params[index].shape).to(device),
                        "exp_avg_sq": torch.from_numpy(progress.moments[2 * n + 1]).reshape(params[index].shape).to(device)}
    saved["state"] = state
    optimiser.load_state_dict(saved)
    generator.set_state(torch.frombuffer(bytearray(progress.generator), dtype=torch.uint8))
    torch.set_rng_state(torch.frombuffer(bytearray(progress.torch_rng), dtype=torch.uint8))


def train_mil(bags: Sequence[BagData], classes: Sequence[str], config: MILConfig,
              clinical_names: Optional[Sequence[str]] = None, weights: Optional[PathLike] = None,
              device: str = "cpu", resume: Optional[PathLike] = None) -> MILTrained:
    """Train on ``bags``; ``weights`` initialises the encoder from a caffemodel (by layer name);
    ``resume``: the folder of a stopped training of the same configuration (:func:`resumable`),
    whose model and progress it goes on from.

    SIGINT/SIGTERM stop after the current batch: the result has ``stopped`` and ``progress`` set."""
    if not bags:
        raise ConfigError("no training bags")
    n_clinical = len(bags[0].clinical) if bags[0].clinical is not None else None
    model, net_param = build_model(config, len(classes), n_clinical)
    progress, history = None, []
    if resume is not None:
        folder = Path(resume)
        model.encoder.load_weights(read_caffemodel(folder / ENCODER_MODEL), folder / ENCODER_MODEL)
        load_modules(folder / HEAD_MODEL, model.stored_modules())
        progress, history = read_progress(folder)
    elif weights is not None:
        model.encoder.load_weights(read_caffemodel(weights), weights)
    mean = image_mean(bags)
    if model.clinical is not None:
        values = np.stack([b.clinical for b in bags]).astype(np.float64)
        model.clinical.standardise.set(*clinical_statistics(values))
    torch_device = torch.device(device)
    model.to(torch_device)
    inputs = [to_tensor(b.images, mean).to(torch_device) for b in bags]
    labels = torch.as_tensor([b.label for b in bags], dtype=torch.long, device=torch_device)
    clinical = stack_clinical(bags)
    clinical = clinical.to(torch_device) if clinical is not None else None
    cached = None
    if config.frozen:
        model.encoder.eval()
        with torch.no_grad():
            cached = [torch.cat([model.features(p) for p in torch.split(x, config.chunk)]) for x in inputs]
        for entry in model.encoder.learnable:
            entry.param.requires_grad_(entry.layer == model.classifier)
    params = _trainable(model, config.frozen)
    optimiser = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(_seed(config.seed, STREAM_ORDER))
    if progress is not None:
        _restore(progress, optimiser, generator, params)
        log.info("resuming at epoch %d of %d, batch %d", progress.epoch + 1, config.epochs,
                 progress.next_batch // config.bags_per_batch + 1)
    stopped = stop_at = None
    with signal_actions() as pending:
        for epoch in range(progress.epoch if progress else 0, config.epochs):
            if progress is not None and progress.order:  # the stopped epoch, from its next batch
                order, start, losses, instances, carried = (progress.order, progress.next_batch,
                                                            list(progress.losses), progress.instances, progress.seconds)
            else:
                order = torch.randperm(len(bags), generator=generator).tolist()
                start, losses, instances, carried = 0, [], 0, 0.0
            progress = None
            started = time.perf_counter()
            model.train()
            next_batch = len(order)
            for first in range(start, len(order), config.bags_per_batch):
                chosen = order[first:first + config.bags_per_batch]
                if cached is not None:
                    per_bag = [cached[i] for i in chosen]
                else:
                    batch = []
                    subsets = []
                    for i in chosen:
                        x = inputs[i]
                        if config.mirror:
                            flips = torch.rand(len(x), generator=generator) < 0.5
                            x = torch.where(flips.reshape(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
                        batch.append(x)
                        subsets.append(torch.randperm(len(x), generator=generator)[:config.grad_instances])
                    per_bag = encode(model, batch, subsets, config.chunk)
                features, mask = pad_bags(per_bag)
                rows = clinical[chosen] if clinical is not None else None
                loss = model.loss(features, mask, labels[chosen], rows)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
                instances += int(mask.sum())
                faults.event(BATCH_EVENT)
                if ACTION_STOP in pending:
                    next_batch = first + config.bags_per_batch
                    break
            seconds = carried + time.perf_counter() - started
            if next_batch < len(order):  # stopped inside the epoch
                stopped = pending.signals[0] if pending.signals else 2
                stop_at = _progress(optimiser, generator, epoch, next_batch, order, losses, instances, seconds)
                break
            history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(seconds, 3),
                            "instances_per_s": round(instances / seconds, 1) if seconds > 0 else None})
            log.info("epoch %d/%d: loss %.4f (%.1f s)", epoch + 1, config.epochs, history[-1]["loss"], seconds)
            if ACTION_STOP in pending:
                stopped = pending.signals[0] if pending.signals else 2
                if epoch + 1 < config.epochs:
                    stop_at = _progress(optimiser, generator, epoch + 1, 0, [], [], 0, 0.0)
                break
    model.cpu()
    return MILTrained(model, config, list(classes), list(clinical_names) if clinical_names else None, mean,
                      net_param, history, stopped if stop_at is not None else None, stop_at)


def resumable(folder: PathLike, config: MILConfig) -> bool:
    """Whether ``folder`` holds a stopped training of ``config`` that :func:`train_mil` can go on from."""
    folder = Path(folder)
    record = read_record(folder / CONFIG_JSON, MIL_RECORD)
    return bool(record and record.get("complete") is False and record.get("config") == config.to_json()
                and isinstance(record.get("resume"), dict) and (folder / RESUME_STATE).is_file())


def read_progress(folder: PathLike) -> tuple[Progress, List[dict]]:
    """The progress and history a stopped training saved in ``folder``; FormatError naming the file
    when they do not fit together."""
    folder = Path(folder)
    record = read_record(folder / CONFIG_JSON, MIL_RECORD, required=True, hint="a model of `lymph-cv mil train`")
    saved = record.get("resume")
    state_path = folder / RESUME_STATE
    moments = history_arrays(read_solverstate(state_path))
    try:
        steps = {int(k): int(v) for k, v in saved["steps"].items()}
        progress = Progress(int(saved["epoch"]), int(saved["next_batch"]), [int(i) for i in saved["order"]],
                            [float(v) for v in saved["losses"]], int(saved["instances"]), float(saved["seconds"]),
                            bytes.fromhex(saved["generator"]), bytes.fromhex(saved["torch_rng"]), steps, moments)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FormatError(f"expected a MIL training's resume record ({exc})", folder / CONFIG_JSON) from None
    if len(moments) != 2 * len(steps):
        raise FormatError(f"{len(moments)} moment blobs for {len(steps)} parameters", state_path)
    return progress, list(record.get("history") or [])


def save_model(trained: MILTrained, folder: PathLike) -> Path:
    """Write the model's files into ``folder`` (each atomically; ``mil.json`` last, so a folder with
    it is complete)."""
    folder = make_dirs(folder)
    model = trained.model
    write_caffemodel(folder / ENCODER_MODEL, model.encoder.export_weights(legacy_dims=False))
    atomic_write_text(folder / ENCODER_DEPLOY, render_deploy_text(
        trained.config.arch, len(trained.classes), trained.config.crop, net_name=f"mil_{trained.config.arch}"))
    blob = array_to_blob(trained.mean[None], legacy=True)
    atomic_write_bytes(folder / ENCODER_MEAN, blob.SerializeToString())
    write_modules(folder / HEAD_MODEL, model.stored_modules())
    progress = trained.progress
    if progress is not None:
        state = caffe_pb2.SolverState(iter=max(progress.steps.values(), default=0))  # Adam's steps
        set_history(state, progress.moments, legacy=False)
        write_solverstate(folder / RESUME_STATE, state)
    record = {"config": trained.config.to_json(), "classes": trained.classes, "clinical": trained.clinical_names,
              "classifier": model.classifier, "feature_blob": model.feature_blob, "history": trained.history,
              "complete": progress is None, "seed": trained.config.seed,
              "files": {"encoder": ENCODER_MODEL, "deploy": ENCODER_DEPLOY, "mean": ENCODER_MEAN, "head": HEAD_MODEL}}
    if progress is not None:
        record["resume"] = progress.to_json()
    atomic_write_json(folder / CONFIG_JSON, record)
    return folder


def load_model(folder: PathLike) -> MILTrained:
    """A saved model, for inference (the encoder in Caffe's TEST phase)."""
    folder = Path(folder)
    record = read_record(folder / CONFIG_JSON, MIL_RECORD, required=True, hint="a model of `lymph-cv mil train`")
    config = MILConfig.from_json(record.get("config", {}), folder / CONFIG_JSON)
    classes = list(record.get("classes") or [])
    names = record.get("clinical")
    model, net_param = build_model(config, len(classes), len(names) if names else None, phase=caffe_pb2.TEST)
    model.encoder.load_weights(read_caffemodel(folder / ENCODER_MODEL), folder / ENCODER_MODEL)
    load_modules(folder / HEAD_MODEL, model.stored_modules())
    mean = read_mean(folder / ENCODER_MEAN)
    mean = mean.reshape(mean.shape[-3:]).astype(np.float32)
    model.eval()
    return MILTrained(model, config, classes, names, mean, net_param, record.get("history", []),
                      None if record.get("complete", True) else 1)


def inference_model(trained: MILTrained) -> MILModel:
    """The trained model with its encoder rebuilt in Caffe's TEST phase (BatchNorm's global
    statistics), sharing every parameter."""
    net = build_net(trained.net_param, caffe_pb2.TEST)
    net.share_weights_from(trained.model.encoder)
    for layer, theirs in zip(net.layers, trained.model.encoder.layers):
        for index, buffer in enumerate(theirs.blobs):
            if not buffer.requires_grad and layer.blobs[index] is not buffer:
                layer.blobs[index] = buffer
    m = trained.model
    model = MILModel(net, m.classifier, m.feature_blob, m.method, m.head, m.clinical, m.fusion)
    if m.fusion == "concat":
        model.fuse = m.fuse
    model.eval()
    return model


def stop_error(trained: MILTrained, folder: PathLike) -> Interrupted:
    signum = trained.stopped or 2
    progress = trained.progress
    if progress is not None and progress.order:
        batches = -(-len(progress.order) // trained.config.bags_per_batch)
        where = (f"in epoch {progress.epoch + 1} of {trained.config.epochs} (after batch "
                 f"{progress.next_batch // trained.config.bags_per_batch} of {batches})")
    else:
        where = f"after epoch {len(trained.history)} of {trained.config.epochs}"
    return Interrupted(f"stopped by {signal_name(signum)} {where}; the model so far is saved (rerun to go on from "
                       "there)", folder, signum=signum)
