"""``topk``: per class, the mean of a bag's k highest instance logits; k_train in the loss (the model
looks for k positive instances in positive bags), k_agg for the decision."""
from __future__ import annotations

from lymph_cv.net.mil.registry import BagOutput, MILHead, register, topk_mean


@register("topk", description="mean of the top-k instance logits (k_train to train, k_agg to decide)")
class TopKHead(MILHead):
    def forward(self, features, logits, mask, classify):
        spec = self.config.k_train if self.training else self.config.k_agg
        pooled, member = topk_mean(logits, mask, spec)
        return BagOutput(pooled, member, pooled)
