"""``vote``: the tutorial's rule as the simplest MIL baseline.  Every instance is trained with its bag's
label; a bag's scores are the fractions of its instances voting for each class (argmax)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lymph_cv.net.mil.registry import VOTE_FLOOR, BagOutput, MILHead, masked_mean, register


@register("vote", description="instances trained with the bag label; the majority vote decides",
          trainable_bag_logits=False)
class VoteHead(MILHead):
    def forward(self, features, logits, mask, classify):
        votes = F.one_hot(logits.argmax(dim=2), logits.shape[2]).to(logits.dtype)
        fractions = masked_mean(votes, mask)
        weights = mask.to(logits.dtype) / mask.sum(dim=1, keepdim=True).clamp(min=1)
        return BagOutput(torch.log(fractions.clamp(min=VOTE_FLOOR)), weights, fractions)

    def loss(self, output, logits, mask, labels):
        targets = labels.reshape(-1, 1).expand(mask.shape)
        return F.cross_entropy(logits[mask], targets[mask])
