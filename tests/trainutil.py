"""Helpers for the training tests: tiny databases, mean files, solver and net prototxts."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from lymph_cv.formats.caffe.blob import write_mean
from lymph_cv.formats.caffe.datum import serialize_datum
from lymph_cv.formats.store import make_key, open_writer

SIZE = 12        # datum height/width of the tiny databases
CROP = 8         # crop size of the tiny nets
CLASSES = 3


def write_db(path: Path, images: np.ndarray, labels: Sequence[int], backend: str = "leveldb") -> Path:
    """A database of raw uint8 Datums keyed like convert_imageset, in the given order."""
    with open_writer(path, backend) as writer:
        for i, (image, label) in enumerate(zip(images, labels)):
            writer.put(make_key(i, f"img_{i}.png"), serialize_datum(image, int(label)))
    return path


def class_images(n: int, seed: int, size: int = SIZE, classes: int = CLASSES):
    """``n`` noisy images whose class shows as a colour cast and a stripe orientation."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    images = rng.normal(110, 25, size=(n, 3, size, size))
    yy, xx = np.mgrid[0:size, 0:size]
    for i, label in enumerate(labels):
        images[i, label] += 50
        stripes = (yy if label == 0 else xx if label == 1 else (yy + xx)) % 4 < 2
        images[i] += 30 * stripes
    return np.clip(images, 0, 255).astype(np.uint8), labels


def make_dataset(root: Path, n_train: int = 192, n_test: int = 96, seed: int = 0,
                 backend: str = "leveldb") -> Path:
    """DB_train_1, DB_test_1 and DB_train_w32_1.binaryproto under ``root`` (the tutorial's names)."""
    root.mkdir(parents=True, exist_ok=True)
    train, train_labels = class_images(n_train, seed)
    test, test_labels = class_images(n_test, seed + 1)
    write_db(root / "DB_train_1", train, train_labels, backend)
    write_db(root / "DB_test_1", test, test_labels, backend)
    write_mean(root / "DB_train_w32_1.binaryproto", train.astype(np.float32).mean(axis=0))
    return root


NET = """name: "tiny"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ mirror: true crop_size: {crop} mean_file: "../DB_train_w32_1.binaryproto" }}
  data_param {{ source: "../DB_train_1" batch_size: {batch} }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ crop_size: {crop} mean_file: "../DB_train_w32_1.binaryproto" }}
  data_param {{ source: "../DB_test_1" batch_size: {batch} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param {{ lr_mult: 1 }} param {{ lr_mult: 2 }}
  convolution_param {{ num_output: 8 pad: 1 kernel_size: 3
    weight_filler {{ type: "gaussian" std: 0.01 }} bias_filler {{ type: "constant" }} }} }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 3 stride: 2 }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "pool1" top: "pool1" }}
{dropout}layer {{ name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  param {{ lr_mult: 1 }} param {{ lr_mult: 2 }}
  inner_product_param {{ num_output: {classes} weight_filler {{ type: "gaussian" std: 0.1 }}
    bias_filler {{ type: "constant" }} }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "ip1" bottom: "label" top: "accuracy"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }}
"""
DROPOUT = 'layer { name: "drop1" type: "Dropout" bottom: "pool1" top: "pool1" dropout_param { dropout_ratio: 0.5 } }\n'

SOLVER = """net: "1-net.prototxt"
test_iter: {test_iter}
test_interval: {test_interval}
base_lr: {base_lr}
lr_policy: "fixed"
display: {display}
max_iter: {max_iter}
weight_decay: 0.004
snapshot: {snapshot}
snapshot_prefix: "1_caffenet_train_w32"
solver_mode: CPU
solver_type: ADAGRAD
random_seed: {seed}
"""


def make_fold(root: Path, *, batch: int = 16, test_iter: int = 6, test_interval: int = 50,
              base_lr: float = 0.01, display: int = 25, max_iter: int = 100, snapshot: int = 50,
              seed: int = 7, dropout: bool = False, net_extra: str = "", solver_extra: str = "") -> Path:
    """``root/1/`` with a solver and a net over ``root``'s databases; returns the solver path."""
    fold = root / "1"
    fold.mkdir(parents=True, exist_ok=True)
    (fold / "1-net.prototxt").write_text(
        NET.format(crop=CROP, batch=batch, classes=CLASSES, dropout=DROPOUT if dropout else "") + net_extra)
    solver = fold / "1-alexnet_solver_ada.prototxt"
    solver.write_text(SOLVER.format(test_iter=test_iter, test_interval=test_interval, base_lr=base_lr,
                                    display=display, max_iter=max_iter, snapshot=snapshot, seed=seed)
                      + solver_extra)
    return solver
