"""PatchCamelyon: import the published HDF5 split into the work directory, or synthesise a small set.

``import_pcam(DIR, WORKDIR)`` turns the three splits into fold 1 of the tutorial's layout, keeping
the published split: train → ``DB_train_1`` + ``train_w32_1.txt`` + the mean file, valid →
``DB_test_1`` + ``test_w32_1.txt`` (what training tests on), test → ``DB_heldout_1`` +
``heldout_w32_1.txt``; raw Datums in BGR (as Caffe stores images), keys ``%08d_<name>``, in the
files' order.  Patches are read in slices, so memory stays at one slice whatever the split size.
``synth_pcam(OUT)`` writes synthetic patches in the exact published file format (labels balanced;
"normal" small-lymphocyte tissue vs "tumour" larger-nucleus tissue, one stain per slide of patches).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import numpy as np

from lymph_cv.core.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text, make_dirs
from lymph_cv.workdir.records import ANY, read_record
from lymph_cv.errors import ConfigError, InputError
from lymph_cv.formats import h5
from lymph_cv.formats.caffe.datum import serialize_datum
from lymph_cv.formats.caffe.mean import MeanAccumulator, write_mean
from lymph_cv.formats.store import check_backend, make_key, open_writer
from lymph_cv.workdir.layout import (DB_TEST, DB_TRAIN, DBS_JSON, HELDOUT_DB, HELDOUT_LIST, MEAN_FILE, PCAM_JSON,
                                     TEST_LIST, TRAIN_LIST)

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: The fold the import fills.
PCAM_FOLD = 1
#: split → (database, list) names in the work directory.
SPLIT_FILES = {"train": (DB_TRAIN, TRAIN_LIST), "valid": (DB_TEST, TEST_LIST), "test": (HELDOUT_DB, HELDOUT_LIST)}
CLASSES = ("normal", "tumour")
#: Synthetic split sizes (the done-when set: about 4,000 training patches).
SYNTH_COUNTS = {"train": 4096, "valid": 512, "test": 512}
#: Synthetic patches per slide (one stain each).
PATCHES_PER_SLIDE = 64
#: Synthetic class → renderer of lymph_cv.stages.synth (small dense lymphocytes vs larger nuclei).
SYNTH_RENDERERS = ("CLL", "MCL")
SYNTH_JSON = "synth.json"


@dataclass(frozen=True)
class ImportedSplit:
    split: str
    count: int
    positives: int
    db: Path
    list_file: Path


def import_pcam(folder: PathLike, workdir: PathLike, *, backend: str = "leveldb", overwrite: bool = False,
                chunk: int = h5.READ_CHUNK) -> Dict[str, ImportedSplit]:
    """Import the three PCam splits of ``folder`` into ``workdir`` (see the module docstring)."""
    folder, workdir = Path(folder), Path(workdir)
    backend = check_backend(backend)
    if chunk < 1:
        raise ConfigError(f"chunk must be positive, got {chunk}")
    for split in h5.PCAM_SPLITS:  # every file checked before anything is written
        with h5.open_split(folder, split):
            pass
    make_dirs(workdir)
    done: Dict[str, ImportedSplit] = {}
    for split in h5.PCAM_SPLITS:
        db_name, list_name = (name.format(fold=PCAM_FOLD) for name in SPLIT_FILES[split])
        mean = MeanAccumulator() if split == "train" else None
        lines, positives = [], 0
        with h5.open_split(folder, split) as (x, y), open_writer(workdir / db_name, backend, overwrite) as writer:
            for start, rgb, labels in h5.iter_chunks(x, y, chunk):
                bgr_chw = np.ascontiguousarray(rgb[..., ::-1].transpose(0, 3, 1, 2))
                for offset, (image, label) in enumerate(zip(bgr_chw, labels)):
                    index = start + offset
                    name = f"pcam_{split}_{index:06d}"
                    writer.put(make_key(index, name), serialize_datum(image, int(label)))
                    lines.append(f"{name}\t{int(label)}\n")
                positives += int((labels == 1).sum())
                if mean is not None:
                    mean.add_batch(bgr_chw.reshape(len(bgr_chw), -1), bgr_chw.shape[1:])
                log.debug("pcam %s: %d patches", split, start + len(labels))
        atomic_write_text(workdir / list_name, "".join(lines))
        if mean is not None:
            write_mean(workdir / MEAN_FILE.format(fold=PCAM_FOLD), mean.mean())
        done[split] = ImportedSplit(split, len(lines), positives, workdir / db_name, workdir / list_name)
        log.info("pcam %s: %d patches (%d tumour) → %s", split, len(lines), positives, db_name)
    atomic_write_json(workdir / DBS_JSON, {"backend": backend, "source": "pcam", "folds": [PCAM_FOLD]})
    atomic_write_json(workdir / PCAM_JSON, {
        "source": os.fspath(folder.resolve()), "classes": list(CLASSES), "fold": PCAM_FOLD, "backend": backend,
        "splits": {s.split: {"count": s.count, "tumour": s.positives, "db": s.db.name, "list": s.list_file.name}
                   for s in done.values()}})
    return done


def synth_pcam(out: PathLike, *, counts: Optional[Mapping[str, int]] = None, seed: int = 0) -> Dict[str, int]:
    """Write synthetic ``camelyonpatch_level_2_split_*`` files to ``out``; returns split → count."""
    from lymph_cv.stages.synth import draw_stain, render_image

    if seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed}")
    counts = dict(SYNTH_COUNTS if counts is None else counts)
    unknown = set(counts) - set(h5.PCAM_SPLITS)
    if unknown or any(n < 1 for n in counts.values()):
        raise ConfigError(f"PCam split counts must be positive, for {', '.join(h5.PCAM_SPLITS)}")
    out = Path(out)
    for index, split in enumerate(h5.PCAM_SPLITS):
        n = counts.get(split, SYNTH_COUNTS[split])
        rng = np.random.default_rng([seed, index])
        labels = np.arange(n) % len(CLASSES)
        rng.shuffle(labels)
        images = np.empty((n, h5.PCAM_SIZE, h5.PCAM_SIZE, h5.PCAM_CHANNELS), np.uint8)
        stain = None
        for i, label in enumerate(labels):
            if i % PATCHES_PER_SLIDE == 0:
                stain = draw_stain(rng)
            images[i] = render_image(SYNTH_RENDERERS[label], int(label), h5.PCAM_SIZE, h5.PCAM_SIZE, stain, rng)
        h5.write_split(out, split, images, labels)
        counts[split] = n
    atomic_write_json(out / SYNTH_JSON, {"layout": "pcam", "seed": seed, "counts": counts,
                                         "classes": list(CLASSES), "renderers": list(SYNTH_RENDERERS)})
    return counts


def score_heldout(workdir: PathLike, model: Optional[PathLike] = None, *, fold: int = PCAM_FOLD,
                  device: str = "cpu", tta: bool = False) -> Dict[str, object]:
    """The fold's TEST net with ``model`` (default: its newest snapshot) on the held-out split:
    accuracy, tumour-vs-normal ROC AUC (with the curve, ``roc.png`` and the operating threshold)
    and the confusion matrix, written to ``eval/heldout_K/``.  Every record is scored once, in key
    order; ``tta`` averages the softmax over the patch's 8 symmetries (flips and quarter turns)."""
    import torch

    from lymph_cv.core.devices import resolve_device
    from lymph_cv.formats.caffe import caffe_pb2
    from lymph_cv.formats.caffe.model import read_caffemodel
    from lymph_cv.formats.caffe.prototxt import read_net_prototxt
    from lymph_cv.formats.store import open_reader
    from lymph_cv.net.archs import get_arch
    from lymph_cv.net.augment import symmetries
    from lymph_cv.stages.roc import ROC_PNG, draw_roc, roc_record
    from lymph_cv.net.build import build_net
    from lymph_cv.stages.train import data_layers, feed, solver_snapshots
    from lymph_cv.workdir.layout import EVAL_DIR, NET_NAME, RENDER_JSON, SOLVER_NAME

    workdir = Path(workdir)
    fold_dir = workdir / str(fold)
    db = workdir / HELDOUT_DB.format(fold=fold)
    if not db.is_dir():
        raise InputError("held-out database not found (run `lymph-cv import pcam` first)", db)
    if model is None:
        snapshots = solver_snapshots(fold_dir / SOLVER_NAME.format(fold=fold), "caffemodel")
        if not snapshots:
            raise InputError("no snapshot to score (train the fold first or pass --model)", fold_dir)
        model = snapshots[max(snapshots)]
    record = read_record(fold_dir / RENDER_JSON, ANY) or {}
    head = get_arch(record.get("arch", "alexnet32w")).head
    net_file = fold_dir / NET_NAME.format(fold=fold)
    net_param = read_net_prototxt(net_file)
    for layer in net_param.layer:
        if layer.type == "Data":
            layer.data_param.source = os.fspath(db.resolve())
    net = build_net(net_param, caffe_pb2.TEST, base_dir=fold_dir, source=net_file)
    net.load_weights(read_caffemodel(model), model)
    target = resolve_device(device)
    net.to(target)
    layers = data_layers(net, caffe_pb2.TEST, 0, lambda p: Path(p) if Path(p).is_absolute() else fold_dir / p)
    with open_reader(db) as reader:
        count = sum(1 for _ in reader)
    batch = int(net.data_layers[0].data_param.batch_size)
    probs, labels = [], []
    with torch.no_grad():
        for i in range(-(-count // batch)):
            inputs = feed(layers, i, target)
            data = next(name for name in inputs if name != "label")
            views = symmetries(inputs[data]) if tta else [inputs[data]]
            prob = sum(torch.softmax(net({**inputs, data: view})[head].float(), dim=1) for view in views) / len(views)
            probs.append(prob.cpu().numpy())
            labels.append(inputs["label"].cpu().numpy())
    prob, label = np.concatenate(probs)[:count], np.concatenate(labels)[:count].astype(int)
    predicted = prob.argmax(axis=1)
    confusion = np.zeros((prob.shape[1], prob.shape[1]), int)
    np.add.at(confusion, (label, predicted), 1)
    roc = roc_record(prob, label, CLASSES)
    metrics = {"model": os.fspath(model), "records": count, "accuracy": float((predicted == label).mean()),
               "auc": roc.get("auc"), "threshold": roc.get("threshold"), "roc": roc, "tta": tta,
               "views": 8 if tta else 1, "confusion": confusion.tolist(), "classes": list(CLASSES)}
    out = workdir / EVAL_DIR / f"heldout_{fold}"
    make_dirs(out)
    atomic_write_json(out / "metrics.json", metrics)
    if roc.get("curve"):
        atomic_write_bytes(out / ROC_PNG, draw_roc(roc, f"held-out (fold {fold}): ROC"))
    log.info("held-out: accuracy %.4f, AUC %s over %d patches", metrics["accuracy"], metrics["auc"], count)
    return metrics
