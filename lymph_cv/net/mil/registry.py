"""The MIL method registry: name → how a bag's instances become bag logits (a :class:`MILHead`).

A head sees, for a batch of B bags padded to N instances, the instance features ``h`` (B, N, D),
the instance logits ``s`` (B, N, C) of the encoder's classifier and the mask (B, N) of real
instances, and returns a :class:`BagOutput`.  To add a method, write a module in this package with a
``MILHead`` subclass decorated ``@register("name", description=...)`` and import it in ``__init__.py``.
"""
from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

from lymph_cv.core.registry import Registry
from lymph_cv.errors import ConfigError

#: Added to masked-out entries before a max/softmax (they never win).
NEG_INF = float("-inf")
#: Floor of the instance-vote fractions before the logarithm (a class no instance voted for).
VOTE_FLOOR = 1e-6


@dataclass(frozen=True)
class KSpec:
    """k of top-k: a count (``5``) or a percentage of the bag (``25%``), at least ``minimum``."""

    count: Optional[int] = None
    percent: Optional[float] = None
    minimum: int = 1

    def resolve(self, n: int) -> int:
        """k for a bag of ``n`` instances (1 ≤ k ≤ n)."""
        k = self.count if self.count is not None else math.ceil(self.percent / 100.0 * n)
        return max(1, min(n, max(self.minimum, k)))

    def __str__(self) -> str:
        text = str(self.count) if self.count is not None else f"{self.percent:g}%"
        return text if self.minimum == 1 else f"{text},min={self.minimum}"


def parse_k(text: str, option: str = "--k") -> KSpec:
    """``5``, ``25%`` or ``25%,min=3`` → :class:`KSpec`; ConfigError naming ``option``."""
    match = re.fullmatch(r"\s*(\d+)(%?)\s*(?:,\s*min\s*=\s*(\d+)\s*)?", str(text))
    if not match or int(match.group(1)) < 1 or (match.group(2) and int(match.group(1)) > 100):
        raise ConfigError(f"{option} {text!r}: expected a count (5), a percentage (25%) or '25%,min=3'")
    minimum = int(match.group(3)) if match.group(3) else 1
    if minimum < 1:
        raise ConfigError(f"{option} {text!r}: the minimum must be at least 1")
    if match.group(2):
        return KSpec(percent=float(match.group(1)), minimum=minimum)
    return KSpec(count=int(match.group(1)), minimum=minimum)


@dataclass(frozen=True)
class HeadConfig:
    """What a head is built from: feature width D, classes C, and the method's settings."""

    features: int
    classes: int
    k_train: KSpec = KSpec(count=5)
    k_agg: KSpec = KSpec(count=5)
    attention_dim: int = 64


@dataclass
class BagOutput:
    """A head's answer for B bags: ``logits`` (B, C); ``weights`` (B, N) how much each instance counts
    (attention, learned weights, top-k membership; 0 where masked); ``embedding`` (B, E) what a
    clinical fusion concatenates to."""

    logits: torch.Tensor
    weights: torch.Tensor
    embedding: torch.Tensor


class MILHead(nn.Module, metaclass=ABCMeta):
    """A MIL pooling head; ``embedding_dim`` is E of :attr:`BagOutput.embedding`."""

    #: Pools instance features (attention) rather than instance logits.
    pools_features = False

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config

    @property
    def embedding_dim(self) -> int:
        return self.config.features if self.pools_features else self.config.classes

    @abstractmethod
    def forward(self, features: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor,
                classify: Callable[[torch.Tensor], torch.Tensor]) -> BagOutput:
        """``classify`` maps features (…, D) to class logits (…, C) (the encoder's classifier)."""

    def loss(self, output: BagOutput, logits: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training loss: cross-entropy of the bag logits against the bag labels."""
        return F.cross_entropy(output.logits, labels)


@dataclass(frozen=True)
class MILMethod:
    name: str
    head: Type[MILHead]
    description: str
    #: Bag logits are trained (a clinical fusion can join them); the instance vote's are not.
    trainable_bag_logits: bool = True


METHODS: Registry[MILMethod] = Registry("MIL method")


def register(name: str, description: str, trainable_bag_logits: bool = True) -> Callable[[Type[MILHead]], Type[MILHead]]:
    """Decorator registering a :class:`MILHead` subclass as the MIL method ``name``."""

    def decorate(cls: Type[MILHead]) -> Type[MILHead]:
        METHODS.register(name)(MILMethod(name, cls, description, trainable_bag_logits))
        return cls

    return decorate


def method_names() -> List[str]:
    return METHODS.names()


def get_method(name: str) -> MILMethod:
    """The method ``name``; ConfigError listing the valid ones."""
    return METHODS.lookup(name)


def build_head(name: str, config: HeadConfig) -> MILHead:
    return get_method(name).head(config)


# -- masked pooling ---------------------------------------------------------------------------

def masked_fill(values: torch.Tensor, mask: torch.Tensor, fill: float) -> torch.Tensor:
    """``values`` (B, N, …) with the masked-out instances set to ``fill``."""
    shape = mask.shape + (1,) * (values.dim() - mask.dim())
    return values.masked_fill(~mask.reshape(shape), fill)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real instances: (B, N, C) → (B, C)."""
    counts = mask.sum(dim=1, keepdim=True).clamp(min=1).to(values.dtype)
    return masked_fill(values, mask, 0.0).sum(dim=1) / counts


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the instances (B, N) of each bag, 0 for padding."""
    return torch.softmax(masked_fill(scores, mask, NEG_INF), dim=1).masked_fill(~mask, 0.0)


def topk_mean(values: torch.Tensor, mask: torch.Tensor, spec: KSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the mean of the k highest values of each bag (k from ``spec`` and the bag's size):
    ((B, C) means, (B, N) fraction of classes for which each instance is among the top k)."""
    counts = mask.sum(dim=1)
    ks = torch.tensor([spec.resolve(int(n)) for n in counts.tolist()], device=values.device)
    ordered, order = masked_fill(values, mask, NEG_INF).sort(dim=1, descending=True)
    ranks = torch.arange(values.shape[1], device=values.device).reshape(1, -1, 1)
    chosen = ranks < ks.reshape(-1, 1, 1)
    means = torch.where(chosen, ordered, torch.zeros_like(ordered)).sum(dim=1) / ks.reshape(-1, 1).to(values.dtype)
    member = torch.zeros_like(values).scatter(1, order, chosen.expand_as(ordered).to(values.dtype))
    return means, member.mean(dim=2) * mask
