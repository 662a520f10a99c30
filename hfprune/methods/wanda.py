"""Wanda (Sun et al. 2023): prune by ``|W_ij| * ||X_j||_2``, compared within each output row."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hfprune.solvers import scores
from hfprune.config import PruningConfig
from hfprune.registry import register_pruner
from hfprune.stats import RowNormStats
from hfprune.methods.base import Pruner


@dataclass
class WandaConfig(PruningConfig):
    """Wanda pruning: weights times input activation norms, from calibration data.

    Example:
        >>> from hfprune import WandaConfig
        >>> WandaConfig(pattern="2:4").sparsity
        0.5
    """

    method: ClassVar[str] = "wanda"

    true_sequential: bool = field(
        default=False,
        metadata={"help": "Default False, as in the Wanda paper's code: every layer of a block is scored from the dense "
                          "block's inputs (one statistics pass, then one pass for the pruned outputs). True prunes the "
                          "layers in call order, each from inputs through the already pruned layers (one pass per block "
                          "when the calibration windows fit one batch)."},
    )


@register_pruner("wanda", config_cls=WandaConfig)
class WandaPruner(Pruner):
    """Wanda: unstructured / N:M by |weight| x input activation norm."""

    requires_calibration = True
    stats_cls = RowNormStats

    def score(self, W, stats):
        return scores.wanda(W, stats.norm)
