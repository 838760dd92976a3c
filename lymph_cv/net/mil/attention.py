"""``attention``: gated attention pooling (Ilse et al. 2018) of the instance features,
a_k = softmax_k(wᵀ(tanh(V h_k) ⊙ sigmoid(U h_k))), z = Σ a_k h_k, bag logits = classifier(z).

The classifier is the encoder's own (linear), so the bag logits equal Σ a_k classifier(h_k): the
instance scores and the bag decision come from one layer the toolchain's evaluate can run.
"""
from __future__ import annotations

import torch
from torch import nn

from lymph_cv.net.mil.registry import BagOutput, MILHead, masked_softmax, register


@register("attention", description="gated attention pooling of the instance features")
class AttentionHead(MILHead):
    pools_features = True

    def __init__(self, config):
        super().__init__(config)
        self.attention_V = nn.Linear(config.features, config.attention_dim)
        self.attention_U = nn.Linear(config.features, config.attention_dim)
        self.attention_w = nn.Linear(config.attention_dim, 1)

    def forward(self, features, logits, mask, classify):
        gate = torch.tanh(self.attention_V(features)) * torch.sigmoid(self.attention_U(features))
        weights = masked_softmax(self.attention_w(gate).squeeze(-1), mask)
        pooled = (weights.unsqueeze(-1) * features).sum(dim=1)
        return BagOutput(classify(pooled), weights, pooled)
