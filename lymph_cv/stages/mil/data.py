"""Bags as arrays the MIL model trains on: each bag's instances centre-cropped to the encoder's input,
BGR uint8 as the image reader gives them, with the bag label and clinical values."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch

from lymph_cv.errors import InputError
from lymph_cv.stages.bags import instance_images


@dataclass
class BagData:
    """One bag: ``images`` (n, H, W, 3) BGR uint8; ``names`` what each instance is (a file, a window);
    ``clinical`` the bag's numeric attributes (raw, standardised by the model) or None;
    ``centres`` (n, 2) instance centres (row, col) in ``parent`` for image/slide bags."""

    bag_id: str
    label: int
    images: np.ndarray
    names: List[str]
    clinical: Optional[np.ndarray] = None
    parent: Optional[str] = None
    centres: Optional[np.ndarray] = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def centre_crop(images: np.ndarray, size: int, where: str = "") -> np.ndarray:
    """The central ``size``×``size`` of (n, H, W, C) images; InputError when they are smaller."""
    height, width = images.shape[1:3]
    if height < size or width < size:
        raise InputError(f"instances of {height}x{width} are smaller than the {size}x{size} crop (set --crop)", where or None)
    top, left = (height - size) // 2, (width - size) // 2
    return images[:, top:top + size, left:left + size]


def image_mean(bags: Sequence[BagData]) -> np.ndarray:
    """The mean instance (C, H, W) float32 over the bags, as Caffe's compute_image_mean."""
    total = None
    count = 0
    for bag in bags:
        s = bag.images.astype(np.float64).sum(axis=0)
        total = s if total is None else total + s
        count += len(bag)
    if not count:
        raise InputError("no instances in the training bags")
    return (total / count).transpose(2, 0, 1).astype(np.float32)


def to_tensor(images: np.ndarray, mean: np.ndarray) -> torch.Tensor:
    """(n, H, W, C) uint8 → (n, C, H, W) float32 minus the mean image (Caffe's preprocessing)."""
    return torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) - mean[None])


def stack_clinical(bags: Sequence[BagData]) -> Optional[torch.Tensor]:
    """(B, A) clinical values of the bags, or None when they have none."""
    if not bags or bags[0].clinical is None:
        return None
    return torch.as_tensor(np.stack([b.clinical for b in bags]), dtype=torch.float32)


def _instance_name(instance) -> str:
    if instance.window is None or instance.parent is not None:
        return instance.path
    return f"{instance.path}@{instance.window.x},{instance.window.y}" + (
        f"r{instance.window.angle}" if instance.window.angle else "")


def bag_data(bag_set, bags: Sequence, crop: int, clinical: bool = False) -> List[BagData]:
    """The bags of a :class:`lymph_cv.stages.bags.BagSet` as :class:`BagData`: every instance read
    (each parent image once) and centre-cropped to ``crop``; ``clinical``: the raw values in the set's
    clinical column order (NaN for a cell to impute).  An image bag (one parent, windowed instances)
    keeps the parent and the window centres, for its heatmap."""
    out = []
    for bag in bags:
        pixels = instance_images(bag_set, bag)
        where = f"bag {bag.id}"
        images = np.stack([centre_crop(p[None], crop, where)[0] for p in pixels]) if pixels else np.zeros(
            (0, crop, crop, 3), np.uint8)
        if not len(images):
            raise InputError(f"bag {bag.id!r} has no instances", bag_set.path)
        if images.ndim == 3:
            images = np.repeat(images[..., None], 3, axis=3)
        values = None
        if clinical:
            values = np.array([np.nan if bag.clinical.get(c) is None else bag.clinical[c]
                               for c in bag_set.clinical_columns], dtype=np.float32)
        parents = {i.path for i in bag.instances}
        windowed = all(i.window is not None and i.parent is None for i in bag.instances)
        parent = centres = None
        if windowed and len(parents) == 1:
            parent = os.fspath(bag_set.instance_path(bag.instances[0]))
            centres = np.array([(i.window.y + i.window.size // 2, i.window.x + i.window.size // 2)
                                for i in bag.instances], dtype=np.int64)
        out.append(BagData(bag.id, int(bag.label), np.ascontiguousarray(images),
                           [_instance_name(i) for i in bag.instances], values, parent, centres))
    return out
