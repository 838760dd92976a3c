"""``learned``: the seed's learned aggregation.  Per class, each instance logit is normalised over its
bag (batch normalisation of the bag: zero mean, unit variance), weighted by
w_k = sigmoid(slope · ŝ_k + offset) with a trained slope and offset per class, and the bag logit is
Σ w_k s_k / Σ w_k (slope → ∞ approaches max, slope 0 the mean)."""
from __future__ import annotations

import torch
from torch import nn

from lymph_cv.net.mil.registry import BagOutput, MILHead, masked_fill, masked_mean, register

#: Variance floor of the per-bag normalisation (a bag of one instance, or of equal logits).
EPS = 1e-5
#: Initial slope: already prefers the higher instance logits.
INITIAL_SLOPE = 1.0


@register("learned", description="sigmoid weights of the bag-normalised logits (trained slope and offset)")
class LearnedHead(MILHead):
    def __init__(self, config):
        super().__init__(config)
        self.slope = nn.Parameter(torch.full((config.classes,), INITIAL_SLOPE))
        self.offset = nn.Parameter(torch.zeros(config.classes))

    def forward(self, features, logits, mask, classify):
        mean = masked_mean(logits, mask).unsqueeze(1)
        var = masked_mean((logits - mean) ** 2, mask).unsqueeze(1)
        normalised = (logits - mean) / torch.sqrt(var + EPS)
        weights = masked_fill(torch.sigmoid(self.slope * normalised + self.offset), mask, 0.0)
        pooled = (weights * logits).sum(dim=1) / weights.sum(dim=1).clamp(min=EPS)
        share = weights / weights.sum(dim=1, keepdim=True).clamp(min=EPS)
        return BagOutput(pooled, share.mean(dim=2), pooled)
