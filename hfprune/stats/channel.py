"""Per-input-channel statistics of a linear layer's input (structured pruning, FLAP)."""

from __future__ import annotations

import torch

__all__ = ["ChannelStats"]


class ChannelStats:
    """Running per-input-channel statistics of a linear layer's input.

    Accumulates ``sum x``, ``sum x^2`` and the token count in float64 (float32 on devices without
    float64 such as MPS), on the device of the first batch.
    """

    def __init__(self, in_features: int):
        if int(in_features) < 1:
            raise ValueError(f"ChannelStats needs in_features >= 1, got {in_features}.")
        self.in_features = int(in_features)
        self.sum = torch.zeros(self.in_features, dtype=torch.float64)
        self.sumsq = torch.zeros(self.in_features, dtype=torch.float64)
        self.count = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Add activations of shape ``[..., in_features]`` (every leading position is a token)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"ChannelStats was built for {self.in_features} input channels but got a tensor "
                f"of shape {tuple(x.shape)}; hook it onto the input of a layer with "
                f"{self.in_features} input features."
            )
        x = x.detach().reshape(-1, self.in_features)
        dtype = torch.float32 if x.device.type == "mps" else torch.float64
        if self.sum.device != x.device or self.sum.dtype != dtype:
            self.sum = self.sum.to(x.device, dtype)
            self.sumsq = self.sumsq.to(x.device, dtype)
        x = x.to(dtype)
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)
        self.count += x.shape[0]

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Add another accumulator's totals into this one (e.g. from another process)."""
        if other.in_features != self.in_features:
            raise ValueError("Cannot merge ChannelStats of different in_features.")
        self.sum = self.sum + other.sum.to(self.sum.device, self.sum.dtype)
        self.sumsq = self.sumsq + other.sumsq.to(self.sumsq.device, self.sumsq.dtype)
        self.count += other.count
        return self

    def state(self) -> dict[str, torch.Tensor]:
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        return {"sum": self.sum, "sumsq": self.sumsq, "count": count}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.sum, self.sumsq = state["sum"].to(self.sum.device), state["sumsq"].to(self.sumsq.device)
        self.count = int(state["count"].item())

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        """Population variance per channel (clamped at 0 against rounding)."""
        n = max(self.count, 1)
        return (self.sumsq / n - (self.sum / n) ** 2).clamp_min(0)

    @property
    def sq_norm(self) -> torch.Tensor:
        """``||X_j||^2`` over all tokens seen, per channel."""
        return self.sumsq

    def __repr__(self) -> str:
        return f"ChannelStats(in_features={self.in_features}, count={self.count})"

