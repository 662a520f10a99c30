"""First and second moments of a layer's input: ``sum x`` and ``X X^T`` (structured compensation).

One accumulator serves every structured need: the Hessian ``X X^T`` of the least-squares
compensation (:mod:`hfprune.solvers.structured`), and the per-channel statistics of
:class:`~hfprune.stats.ChannelStats` (``mean``, ``var``, ``sq_norm`` = the diagonal) that the
Wanda / fluctuation importances and FLAP's bias compensation read.
"""

from __future__ import annotations

import torch

__all__ = ["MomentStats"]


class MomentStats:
    """Running ``sum_t x_t``, ``sum_t x_t x_t^T`` and the token count (see :mod:`hfprune.stats.base`).

    Products are computed in float32 (a fast GEMM) and summed in float64, like
    :class:`~hfprune.stats.HessianStats`; memory ``8 * in_features^2`` bytes.
    """

    def __init__(self, in_features: int):
        if int(in_features) < 1:
            raise ValueError(f"MomentStats needs in_features >= 1, got {in_features}.")
        self.in_features = int(in_features)
        self.xtx: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.count = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"MomentStats was built for {self.in_features} input channels but got a tensor of "
                             f"shape {tuple(x.shape)}; hook it onto a layer with {self.in_features} input features.")
        x = x.detach().reshape(-1, self.in_features).float()
        if self.xtx is None:
            self.xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=x.device)
            self.sum = torch.zeros(self.in_features, dtype=torch.float64, device=x.device)
        x = x.to(self.xtx.device)
        self.xtx += (x.T @ x).double()
        self.sum += x.sum(0).double()
        self.count += x.shape[0]

    def merge(self, other: "MomentStats") -> "MomentStats":
        if other.in_features != self.in_features:
            raise ValueError("Cannot merge MomentStats of different in_features.")
        self._add(other, "xtx", "sum")
        self.count += other.count
        return self

    def _add(self, other: "MomentStats", *names: str) -> None:
        """``self.<name> += other.<name>`` for the sums that stay ``None`` until a first batch."""
        for name in names:
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is not None:
                setattr(self, name, theirs.clone() if mine is None else mine.add_(theirs.to(mine.device)))

    def state(self) -> dict[str, torch.Tensor]:
        n = self.in_features
        xtx = self.xtx if self.xtx is not None else torch.zeros(n, n, dtype=torch.float64)
        total = self.sum if self.sum is not None else torch.zeros(n, dtype=torch.float64)
        return {"xtx": xtx, "sum": total, "count": torch.tensor([float(self.count)], dtype=torch.float64,
                                                                device=xtx.device)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.xtx = state["xtx"].double().clone()
        self.sum = state["sum"].double().clone()
        self.count = int(round(float(state["count"].reshape(-1)[0])))

    def _check(self) -> None:
        if self.xtx is None or self.count == 0:
            raise ValueError("MomentStats saw no tokens; run calibration batches through the layer first.")

    @property
    def hessian(self) -> torch.Tensor:
        """``X X^T / n`` (float64; the scale does not change a least-squares solution)."""
        self._check()
        return self.xtx / self.count

    @property
    def mean(self) -> torch.Tensor:
        self._check()
        return self.sum / self.count

    @property
    def sq_norm(self) -> torch.Tensor:
        """``||X_j||^2`` per channel (the diagonal of ``X X^T``)."""
        self._check()
        return self.xtx.diagonal().clone()

    @property
    def var(self) -> torch.Tensor:
        """Population variance per channel (clamped at 0 against rounding)."""
        self._check()
        return (self.xtx.diagonal() / self.count - self.mean ** 2).clamp_min(0)

    def __repr__(self) -> str:
        return f"MomentStats(in_features={self.in_features}, count={self.count})"
