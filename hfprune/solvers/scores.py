"""Importance scores: pure functions ``(W, stats) -> score``; higher means keep."""

from __future__ import annotations

import torch

__all__ = ["magnitude", "wanda"]


def magnitude(W: torch.Tensor) -> torch.Tensor:
    """``|W_ij|`` (Han et al. 2015)."""
    return W.abs().float()


def wanda(W: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda score ``S_ij = |W_ij| * ||X_j||_2`` (Sun et al. 2023, Eq. 1).

    Args:
        W: weight ``[out_features, in_features]``.
        input_norm: ``||X_j||_2`` over calibration tokens, ``[in_features]``.
    """
    return W.abs().float() * input_norm.to(W.device, torch.float32).reshape(1, -1)
