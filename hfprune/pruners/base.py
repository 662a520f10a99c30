"""Base class of the unstructured / N:M pruning methods.

A pruner answers three questions for one linear layer, and never touches devices or hooks
(the runner does that):

* :meth:`Pruner.make_stats`: which calibration statistic to accumulate from the layer's inputs
  (``None`` for data-free methods);
* :meth:`Pruner.score`: the importance of every weight (used for masks and global budgets);
* :meth:`Pruner.prune_weight`: the pruned-mask and, for methods that also update the kept
  weights (SparseGPT), the new weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import PruningConfig
from ..masks import select_mask

__all__ = ["Pruner", "PruneResult"]


@dataclass
class PruneResult:
    pruned: torch.Tensor
    """Boolean ``[out, in]`` mask, True where the weight is removed."""
    weight: torch.Tensor | None = None
    """New ``[out, in]`` weight for methods that update kept weights; ``None`` keeps them."""


class Pruner:
    name: ClassVar[str] = ""
    config_cls: ClassVar[type[PruningConfig]] = PruningConfig
    requires_calibration: ClassVar[bool] = False

    def __init__(self, config: PruningConfig):
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}.")
        self.config = config

    def make_stats(self, in_features: int, device: torch.device) -> Any | None:
        """A fresh statistics accumulator for a layer with ``in_features`` inputs."""
        return None

    def score(self, W: torch.Tensor, stats: Any | None) -> torch.Tensor:
        raise NotImplementedError

    def prune_weight(self, W: torch.Tensor, stats: Any | None, sparsity: float, scope: str) -> PruneResult:
        """Default: mask the lowest scores with the configured pattern and scope."""
        return PruneResult(pruned=select_mask(self.score(W, stats), sparsity, self.config.pattern, scope))
