"""The statistics protocol every accumulator follows (pure torch, no hooks: the runner feeds them).

Sums are kept in float64 so the result does not depend on how the tokens were split into batches
(up to float64 rounding), which makes multi-process reduction reproducible
(:mod:`hfprune.core.distributed` moves ``state()`` between processes).
"""

from __future__ import annotations

from typing import Protocol

import torch


class Stats(Protocol):
    def add_batch(self, x: torch.Tensor) -> None:
        """Add the tokens of one batch of layer inputs ``x`` (shape ``[..., in_features]``)."""

    def merge(self, other: "Stats") -> "Stats":
        """Add another accumulator's sums into this one and return it."""

    def state(self) -> dict[str, torch.Tensor]:
        """Raw sums as tensors (for a broadcast / all-reduce)."""

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the sums with ``state`` (the output of :meth:`state`)."""
