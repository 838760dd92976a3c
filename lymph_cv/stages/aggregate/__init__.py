"""Aggregations (window probabilities → image scores), a registry like the layer registry.

Built in: ``vote`` (the tutorial's), ``mean``, ``topk:K``.  To add one, write a module here (see
:mod:`.topk`) and import it below; ``evaluate --aggregate`` and ``run --aggregate`` then take it.
"""
# Importing a module registers it; the order is the order of the choices in help and errors.
from lymph_cv.stages.aggregate import vote  # noqa: F401, I001
from lymph_cv.stages.aggregate import mean  # noqa: F401, I001
from lymph_cv.stages.aggregate import topk  # noqa: F401, I001
from lymph_cv.stages.aggregate.registry import (AGGREGATIONS, Aggregate, Aggregation, aggregate_scores,
                                                aggregation_choices, parse_aggregate, register)
from lymph_cv.stages.aggregate.vote import vote_counts

__all__ = ["AGGREGATIONS", "Aggregate", "Aggregation", "aggregate_scores", "aggregation_choices", "parse_aggregate",
           "register", "vote_counts"]
