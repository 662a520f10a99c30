"""Calibration statistics accumulated from a layer's inputs (pure torch, no hooks).

Each class has ``add_batch(x)`` where ``x`` is the input of a linear layer with shape
``[..., in_features]``. Sums are kept in float64 so the result does not depend on how the
tokens were split into batches (up to float64 rounding), which makes multi-process reduction
reproducible.
"""

from __future__ import annotations

import torch

__all__ = ["RowNormStats"]


class RowNormStats:
    """Squared L2 norm of every input feature over all calibration tokens: ``||X_j||_2^2``.

    This is the activation statistic of Wanda (Sun et al. 2023, Eq. 1):
    ``S_ij = |W_ij| * ||X_j||_2``.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.sq_norm = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.sq_norm += x.float().pow(2).sum(dim=0).to(torch.float64)
        self.tokens += x.shape[0]

    def merge(self, other: "RowNormStats") -> None:
        self.sq_norm += other.sq_norm.to(self.sq_norm.device)
        self.tokens += other.tokens

    @property
    def norm(self) -> torch.Tensor:
        """``||X_j||_2`` for every input feature ``j`` (float32)."""
        return self.sq_norm.sqrt().float()
