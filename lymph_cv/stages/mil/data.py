"""Bags as arrays the MIL model trains on: each bag's instances centre-cropped to the encoder's input,
BGR uint8 as the image reader gives them, with the bag label and clinical values."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch

from lymph_cv.errors import InputError


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
