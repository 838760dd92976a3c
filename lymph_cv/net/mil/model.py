"""The bag model: a Caffe instance encoder (a :class:`~lymph_cv.net.build.CaffeNet` of an architecture
of the registry), a MIL head, and optionally the clinical MLP with its fusion.

The encoder's classifier (its last InnerProduct, e.g. ``ip2`` / ``fc``) gives the instance logits;
its input blob (``ip1`` / ``pool5``) the instance features.  Training runs the trunk with gradients
on a random subset of each bag's instances and under ``no_grad`` on the rest (:func:`encode`);
``frozen`` keeps the trunk fixed and trains the classifier, head and MLP on cached features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lymph_cv.errors import ConfigError
from lymph_cv.net.build import CaffeNet
from lymph_cv.net.mil.clinical import FUSIONS, ClinicalMLP
from lymph_cv.net.mil.registry import BagOutput, MILHead, get_method

INPUT_BLOB = "data"


@dataclass
class BagPrediction:
    """Bag probabilities (B, C), instance logits (B, N, C), instance weights (B, N), the mask."""

    probs: torch.Tensor
    logits: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor


class MILModel(nn.Module):
    """Encoder + head (+ clinical MLP).  ``classifier``: the encoder's last InnerProduct layer;
    ``feature_blob``: its bottom."""

    def __init__(self, encoder: CaffeNet, classifier: str, feature_blob: str, method: str, head: MILHead,
                 clinical: Optional[ClinicalMLP] = None, fusion: Optional[str] = None):
        super().__init__()
        if (clinical is None) != (fusion is None):
            raise ConfigError("--fusion needs clinical attributes (--clinical), and clinical attributes a --fusion")
        if fusion is not None and fusion not in FUSIONS:
            raise ConfigError(f"--fusion {fusion!r}", valid=FUSIONS)
        if fusion in ("concat", "sum") and not get_method(method).trainable_bag_logits:
            raise ConfigError(f"--fusion {fusion}: MIL method {method!r} has no trained bag logits; use --fusion late")
        self.encoder = encoder
        self.classifier = classifier
        self.feature_blob = feature_blob
        self.method = method
        self.head = head
        self.clinical = clinical
        self.fusion = fusion
        if fusion == "concat":
            self.fuse = nn.Linear(head.embedding_dim + clinical.clinical_ip1.out_features, head.config.classes)
            self._start_fuse_as_head()

    def _start_fuse_as_head(self) -> None:
        """The concatenation's layer starts as the bag model alone (the encoder's classifier on an attention
        embedding, the identity on pooled logits; clinical weights 0): a fresh layer over unnormalised
        embeddings trained a few epochs was unstable."""
        width = self.head.embedding_dim
        with torch.no_grad():
            self.fuse.weight.zero_()
            self.fuse.bias.zero_()
            if self.head.pools_features:
                layer = self.encoder.layer(self.classifier)
                self.fuse.weight[:, :width] = layer.blobs[0].t() if layer.transpose else layer.blobs[0]
                if layer.bias_term:
                    self.fuse.bias.copy_(layer.blobs[1])
            else:
                self.fuse.weight[:, :width] = torch.eye(width)

    def stored_modules(self) -> dict:
        """The modules stored beside the encoder's caffemodel (see :mod:`.storage`)."""
        modules = {"head": self.head}
        if self.clinical is not None:
            modules["clinical"] = self.clinical
        if self.fusion == "concat":
            modules["fuse"] = self.fuse
        return modules

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits of features (…, D) by the encoder's classifier layer."""
        layer = self.encoder.layer(self.classifier)
        weight = layer.blobs[0].t() if layer.transpose else layer.blobs[0]
        return F.linear(features, weight, layer.blobs[1] if layer.bias_term else None)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Instance features (n, D) of preprocessed images (n, C, H, W)."""
        return self.encoder({INPUT_BLOB: images})[self.feature_blob].flatten(1)

    def bags(self, features: torch.Tensor, mask: torch.Tensor, clinical: Optional[torch.Tensor] = None
             ) -> tuple[BagOutput, torch.Tensor, Optional[torch.Tensor]]:
        """(fused head output, instance logits (B, N, C), clinical logits of a late fusion or None)."""
        logits = self.classify(features)
        out = self.head(features, logits, mask, self.classify)
        late = None
        if self.fusion == "concat":
            out.logits = self.fuse(torch.cat([out.embedding, self.clinical.hidden(clinical)], dim=1))
        elif self.fusion == "sum":
            out.logits = out.logits + self.clinical(clinical)
        elif self.fusion == "late":
            late = self.clinical(clinical)
        return out, logits, late

    def loss(self, features: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
             clinical: Optional[torch.Tensor] = None) -> torch.Tensor:
        out, logits, late = self.bags(features, mask, clinical)
        loss = self.head.loss(out, logits, mask, labels)
        if late is not None:
            loss = loss + F.cross_entropy(late, labels)  # disjoint parameters: trained separately
        return loss

    def predict(self, features: torch.Tensor, mask: torch.Tensor, clinical: Optional[torch.Tensor] = None) -> BagPrediction:
        out, logits, late = self.bags(features, mask, clinical)
        probs = torch.softmax(out.logits, dim=1)
        if late is not None:
            probs = (probs + torch.softmax(late, dim=1)) / 2
        return BagPrediction(probs, logits, out.weights, mask)


def pad_bags(per_bag: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of different sizes (each (n_i, D)) → padded (B, N, D) and the mask (B, N) of real rows."""
    width = max(int(t.shape[0]) for t in per_bag)
    padded = per_bag[0].new_zeros((len(per_bag), width) + tuple(per_bag[0].shape[1:]))
    mask = torch.zeros((len(per_bag), width), dtype=torch.bool, device=per_bag[0].device)
    for index, t in enumerate(per_bag):
        padded[index, :t.shape[0]] = t
        mask[index, :t.shape[0]] = True
    return padded, mask


def encode(model: MILModel, bags: Sequence[torch.Tensor], with_grad: Sequence[torch.Tensor], chunk: int) -> List[torch.Tensor]:
    """Instance features of each bag (n_i, C, H, W): rows ``with_grad[i]`` (indices) through the
    trunk with gradients, in one batch over all bags; the rest under ``no_grad`` in chunks."""
    grad_rows = torch.cat([bag[idx] for bag, idx in zip(bags, with_grad)]) if bags else None
    grad_features = model.features(grad_rows) if grad_rows is not None and len(grad_rows) else None
    out, start = [], 0
    for bag, idx in zip(bags, with_grad):
        rest = torch.ones(len(bag), dtype=torch.bool)
        rest[idx] = False
        features = None
        if grad_features is not None:
            part = grad_features[start:start + len(idx)]
            start += len(idx)
            features = part.new_zeros((len(bag), part.shape[1]))
            features = features.index_copy(0, idx.to(part.device), part)
        if rest.any():
            with torch.no_grad():
                others = torch.cat([model.features(piece) for piece in torch.split(bag[rest], chunk)])
            if features is None:
                features = others
            else:
                rows = torch.nonzero(rest).flatten().to(others.device)
                features = features.index_copy(0, rows, others)
        out.append(features)
    return out
