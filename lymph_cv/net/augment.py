"""Training-time augmentation beyond Caffe's crop and mirror: vertical flips, quarter turns, mixup
and label smoothing (the solver's ``augmentation_param``, a lymph_cv extension of caffe.proto).

Every draw is a pure function of ``(seed, phase, batch index)`` like the data layer's crops, each kind
from its own stream, so a resumed run sees exactly the batches of an uninterrupted one and switching
one augmentation on leaves the others' draws unchanged:

* flips and turns (histology has no up): per sample, a vertical flip with probability ½ and
  0–3 quarter turns counter-clockwise, applied after Caffe's transform (crop, mean, scale, mirror);
  with the mirror these reach all eight symmetries of the square;
* mixup (Zhang et al.; fastai's ``MixUp``): per sample λ ~ Beta(α, α), λ = max(λ, 1 − λ) so the
  sample keeps its own identity, and a partner from a random permutation of the batch:
  ``x = λ·x + (1 − λ)·x[partner]``, target ``λ·t + (1 − λ)·t[partner]``;
* label smoothing: the one-hot target becomes ``(1 − ε)·onehot + ε / classes``.

Mixup and smoothing turn the label blob into soft targets (N × classes), which SoftmaxWithLoss takes
as cross-entropy against a distribution (equal to λ·loss(label) + (1 − λ)·loss(partner's label)).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from lymph_cv.errors import ConfigError
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.net.hed import DEFAULT_SCALE_SIGMA, DEFAULT_SHIFT_SIGMA, check_sigmas

#: keys appended to (seed, phase, batch) for each kind of draw (the crops use the bare triple).
STREAM_GEOMETRY = 1
STREAM_MIXUP = 2
STREAM_STAIN = 3
#: quarter turns a sample may get (0, 90, 180 or 270 degrees).
QUARTER_TURNS = 4


@dataclass(frozen=True)
class Augmentation:
    """The augmentations of one run; all off by default (Caffe's own behaviour)."""

    mixup_alpha: float = 0.0
    label_smoothing: float = 0.0
    vertical_flip: bool = False
    rotate90: bool = False
    #: HED stain jitter of the uint8 samples before Caffe's transform (see lymph_cv.net.hed).
    stain_jitter: bool = False
    stain_scale_sigma: float = DEFAULT_SCALE_SIGMA
    stain_shift_sigma: float = DEFAULT_SHIFT_SIGMA

    def __post_init__(self) -> None:
        check_sigmas(self.stain_scale_sigma, self.stain_shift_sigma)
        if not (math.isfinite(self.mixup_alpha) and self.mixup_alpha >= 0):
            raise ConfigError(f"mixup alpha must be a finite number >= 0 (0 = off), got {self.mixup_alpha:g}")
        if not (math.isfinite(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            raise ConfigError(f"label smoothing must be in [0, 1), got {self.label_smoothing:g}")

    @classmethod
    def from_param(cls, param: caffe_pb2.AugmentationParameter, **overrides) -> "Augmentation":
        """The solver's ``augmentation_param`` with ``overrides`` (None values ignored) applied."""
        values = {name: getattr(param, name) for name in cls.__dataclass_fields__}
        values.update({name: value for name, value in overrides.items() if value is not None})
        # float32 fields read back as 0.4000000059604645 for 0.4: take the shortest decimal that
        # float32 prints, so a solver's 0.4 and a command line's 0.4 draw the same λ
        return cls(**{name: (float(str(np.float32(v))) if isinstance(v, float) else v) for name, v in values.items()})

    @property
    def geometric(self) -> bool:
        return self.vertical_flip or self.rotate90

    @property
    def soft_labels(self) -> bool:
        """Whether the label blob becomes soft targets (mixup or label smoothing)."""
        return self.mixup_alpha > 0 or self.label_smoothing > 0

    def record(self) -> dict:
        """JSON-ready settings (render.json, train.json)."""
        values = asdict(self)
        if not self.stain_jitter:  # records of runs without stain jitter stay as they were
            values = {name: value for name, value in values.items() if not name.startswith("stain_")}
        return {name: (round(value, 7) if isinstance(value, float) else value) for name, value in values.items()}

    def to_param(self) -> caffe_pb2.AugmentationParameter:
        return caffe_pb2.AugmentationParameter(**asdict(self))


def stream(seed: int, phase: int, batch: int, kind: int) -> np.random.Generator:
    """The random stream of draws ``kind`` for batch number ``batch``."""
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, phase, batch, kind])


# ----------------------------------------------------------------------------- flips and turns
def geometry_draws(rng: np.random.Generator, n: int, vertical_flip: bool, rotate90: bool
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """Per sample: (flip upside down?, quarter turns 0..3); the flips are drawn first."""
    flips = rng.integers(0, 2, size=n).astype(bool) if vertical_flip else np.zeros(n, dtype=bool)
    turns = rng.integers(0, QUARTER_TURNS, size=n) if rotate90 else np.zeros(n, dtype=np.int64)
    return flips, turns


def flip_and_turn(data: np.ndarray, flips: np.ndarray, turns: np.ndarray) -> np.ndarray:
    """(N, C, H, W) batch with sample ``i`` flipped vertically if ``flips[i]``, then turned
    ``turns[i]`` quarter turns counter-clockwise (``np.rot90`` on H × W), in place: each of the
    7 non-trivial (flip, turns) groups is gathered, viewed flipped and turned, and written back once."""
    if turns.any() and data.shape[2] != data.shape[3]:
        raise ConfigError(f"quarter turns need square samples, got {data.shape[2]}×{data.shape[3]}")
    for flip in (False, True):
        for k in range(QUARTER_TURNS):
            chosen = (flips == flip) & (turns == k)
            if (flip or k) and chosen.any():
                group = data[chosen]
                data[chosen] = np.rot90(group[:, :, ::-1] if flip else group, k, axes=(2, 3))
    return data


def symmetries(data: torch.Tensor) -> List[torch.Tensor]:
    """The 8 symmetries of the square of an (N, C, H, W) batch (test-time augmentation): each
    quarter turn of the batch and of its mirror image, the identity first."""
    mirrored = torch.flip(data, dims=(3,))
    return [torch.rot90(view, k, dims=(2, 3)) for k in range(QUARTER_TURNS) for view in (data, mirrored)]


# ----------------------------------------------------------------------------- mixup and targets
def mixup_draws(rng: np.random.Generator, n: int, alpha: float) -> Tuple[np.ndarray, np.ndarray]:
    """(λ per sample, max(λ, 1 − λ) of a Beta(α, α) draw; partner index per sample, a permutation)."""
    lam = rng.beta(alpha, alpha, size=n)
    return np.maximum(lam, 1.0 - lam), rng.permutation(n)


def soft_targets(labels: torch.Tensor, classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(N, classes) float32 targets of integer-valued labels, smoothed by ``smoothing``."""
    hard = labels.reshape(-1).to(torch.long)
    if hard.numel() and (int(hard.min()) < 0 or int(hard.max()) >= classes):
        raise ConfigError(f"labels must be in 0..{classes - 1} for {classes} classes, "
                          f"got {int(hard.min())}..{int(hard.max())}")
    targets = torch.nn.functional.one_hot(hard, classes).to(torch.float32)
    if smoothing:
        targets = targets * (1.0 - smoothing) + smoothing / classes
    return targets


def mix(data: torch.Tensor, targets: torch.Tensor, lam: np.ndarray, partner: np.ndarray
        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mixup of a batch: each sample blended with its partner by its λ, data and targets alike."""
    weight = torch.as_tensor(lam, dtype=torch.float32, device=data.device)
    index = torch.as_tensor(partner, dtype=torch.long, device=data.device)
    shape = (-1,) + (1,) * (data.dim() - 1)
    # partner + λ·(own − partner) = λ·own + (1 − λ)·partner, in one gather and one pass
    mixed = data.index_select(0, index).lerp_(data, weight.reshape(shape))
    return mixed, targets.index_select(0, index).lerp_(targets, weight[:, None])


def augment_labels(data: torch.Tensor, labels: torch.Tensor, classes: int, augmentation: Augmentation,
                   rng: Optional[np.random.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(data, soft targets) of a TRAIN batch: label smoothing, then mixup when α > 0 (``rng`` its
    stream, :func:`stream` with :data:`STREAM_MIXUP`)."""
    targets = soft_targets(labels, classes, augmentation.label_smoothing)
    if augmentation.mixup_alpha > 0:
        lam, partner = mixup_draws(rng, len(targets), augmentation.mixup_alpha)
        data, targets = mix(data, targets, lam, partner)
    return data, targets
