"""Wanda's input statistic ``||X_j||_2^2`` (see :mod:`hfprune.stats.base` for the protocol)."""

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

    def merge(self, other: "RowNormStats") -> "RowNormStats":
        self.sq_norm += other.sq_norm.to(self.sq_norm.device)
        self.tokens += other.tokens
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return {"sq_norm": self.sq_norm, "tokens": torch.tensor([float(self.tokens)], dtype=torch.float64,
                                                                device=self.sq_norm.device)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.sq_norm = state["sq_norm"].to(self.sq_norm.device, torch.float64)
        self.tokens = int(state["tokens"].item())

    @property
    def norm(self) -> torch.Tensor:
        """``||X_j||_2`` for every input feature ``j`` (float32)."""
        return self.sq_norm.sqrt().float()
