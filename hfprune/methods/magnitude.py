"""Magnitude pruning: remove the smallest ``|W_ij|`` (data-free baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hfprune.solvers import scores
from hfprune.config import PruningConfig
from hfprune.registry import register_pruner
from hfprune.methods.base import Pruner


@dataclass
class MagnitudeConfig(PruningConfig):
    """Magnitude pruning (no calibration data).

    Example:
        >>> from hfprune import MagnitudeConfig
        >>> MagnitudeConfig(sparsity=0.5).pattern
        'unstructured'
    """

    method: ClassVar[str] = "magnitude"


@register_pruner("magnitude", config_cls=MagnitudeConfig)
class MagnitudePruner(Pruner):
    """Unstructured / N:M by weight magnitude (no calibration data)."""

    requires_calibration = False

    def score(self, W, stats):
        return scores.magnitude(W)
