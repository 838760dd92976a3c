"""Clinical attributes: a small MLP over standardised numeric attributes (age, lymphocyte count,
gender, …) and how it joins the bag model (``--fusion``):

* ``concat``: the bag embedding and the MLP's hidden layer, concatenated, through one linear layer;
* ``sum``: the MLP's class logits added to the bag logits;
* ``late``: the MLP trained on its own (its loss beside the bag loss, no shared parameter) and its
  class probabilities averaged with the bag model's.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

FUSIONS = ("concat", "sum", "late")
#: Hidden units of the clinical MLP.
HIDDEN = 16
#: Standard deviation floor (a constant attribute in the training bags).
MIN_SD = 1e-6


class Standardise(nn.Module):
    """(x − mean) / sd with the training bags' statistics, a missing value (NaN) first filled with the
    training median; stored with the model."""

    caffe_type = "MILStandardise"

    def __init__(self, n_attributes: int):
        super().__init__()
        self.register_buffer("median", torch.zeros(n_attributes))
        self.register_buffer("mean", torch.zeros(n_attributes))
        self.register_buffer("sd", torch.ones(n_attributes))

    def set(self, median: Sequence[float], mean: Sequence[float], sd: Sequence[float]) -> None:
        """The statistics of the training bags (e.g. :class:`lymph_cv.stages.bags.ClinicalScaler`'s)."""
        for buffer, values in ((self.median, median), (self.mean, mean), (self.sd, sd)):
            buffer.copy_(torch.as_tensor(list(values), dtype=torch.float32))
        self.sd.clamp_(min=MIN_SD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.where(torch.isnan(x), self.median.expand_as(x), x)
        return (x - self.mean) / self.sd


class ClinicalMLP(nn.Module):
    """standardise → linear → ReLU (the hidden layer ``hidden``) → linear (class logits)."""

    def __init__(self, n_attributes: int, classes: int, hidden: int = HIDDEN):
        super().__init__()
        self.standardise = Standardise(n_attributes)
        self.clinical_ip1 = nn.Linear(n_attributes, hidden)
        self.clinical_ip2 = nn.Linear(hidden, classes)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.clinical_ip1(self.standardise(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clinical_ip2(self.hidden(x))
