"""``mean``: the bag logits are the mean of its instance logits."""
from __future__ import annotations

from lymph_cv.net.mil.registry import BagOutput, MILHead, masked_mean, register


@register("mean", description="mean of the instance logits")
class MeanHead(MILHead):
    def forward(self, features, logits, mask, classify):
        pooled = masked_mean(logits, mask)
        weights = mask.to(logits.dtype) / mask.sum(dim=1, keepdim=True).clamp(min=1)
        return BagOutput(pooled, weights, pooled)
