"""``max``: per class, the bag logit is its highest instance logit (the standard MIL assumption)."""
from __future__ import annotations

from lymph_cv.net.mil.registry import NEG_INF, BagOutput, MILHead, masked_fill, register


@register("max", description="per class, the highest instance logit")
class MaxHead(MILHead):
    def forward(self, features, logits, mask, classify):
        pooled, index = masked_fill(logits, mask, NEG_INF).max(dim=1)
        weights = logits.new_zeros(mask.shape).scatter_add(1, index, logits.new_ones(index.shape)) / logits.shape[2]
        return BagOutput(pooled, weights, pooled)
