"""Structured selection: how many heads / neurons each block loses and which ones."""

from __future__ import annotations

import logging
from typing import Sequence

import torch

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def removal_count(n_units: int, ratio: float, *, strict: bool, what: str, hint: str = "") -> int:
    """How many of ``n_units`` to remove for ``ratio`` (fraction removed).

    The count is rounded to the nearest whole unit (for GQA the units are KV groups or one query
    head per group), and with ``strict`` a ratio that is not a whole number of units logs the
    fraction actually removed. Raises ``ValueError`` when a ratio above 0 rounds to nothing
    (with ``strict``) or when everything would be removed.
    """
    exact = ratio * n_units
    count = int(round(exact))
    if strict and abs(exact - count) > 1e-6:
        valid = ", ".join(_fmt(k / n_units) for k in range(1, n_units))
        if count == 0:
            raise ValueError(f"{what}: ratio {ratio} is less than half of one unit out of {n_units} and would remove "
                             f"nothing; use one of {valid}{hint}.")
        logger.warning("%s: ratio %s rounded to %d of %d units (%s removed); allowed ratios: %s.", what, ratio,
                       count, n_units, _fmt(count / n_units), valid)
    if count >= n_units and n_units > 0 and ratio > 0:
        raise ValueError(f"{what}: ratio {ratio} would remove all {n_units} units; use a ratio below "
                         f"{_fmt((n_units - 0.5) / n_units)} so at least one is kept{hint}.")
    return count


def head_units(num_heads: int, num_kv_heads: int, gqa_mode: str) -> tuple[str, int]:
    """The unit heads are removed in: ``("slice", group_size)`` for GQA per-group pruning (a
    slice is one query head from every KV group) or ``("group", num_kv_heads)`` (whole KV groups,
    which for multi-head attention are single heads)."""
    group_size = num_heads // num_kv_heads
    if gqa_mode == "per_group" and group_size > 1:
        return "slice", group_size
    return "group", num_kv_heads


def unit_scores(head_scores: torch.Tensor, num_kv_heads: int, gqa_mode: str, kv_scores: torch.Tensor | None) -> torch.Tensor:
    """Scores of the removal units, sorted ascending (cheapest unit first)."""
    num_heads = head_scores.numel()
    kind, _ = head_units(num_heads, num_kv_heads, gqa_mode)
    grouped = head_scores.reshape(num_kv_heads, num_heads // num_kv_heads)
    if kind == "slice":
        return grouped.sort(dim=1, stable=True).values.sum(0)
    groups = grouped.sum(1)
    if kv_scores is not None:
        groups = groups + kv_scores.to(groups.device, groups.dtype)
    return groups.sort(stable=True).values


def select_heads(head_scores: torch.Tensor, num_kv_heads: int, n_remove: int, gqa_mode: str = "per_group",
                 kv_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the heads to keep. ``n_remove`` counts units (see :func:`head_units`).

    Returns sorted ``(keep_query_heads, keep_kv_heads)`` index tensors.
    """
    num_heads = head_scores.numel()
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not split into {num_kv_heads} KV groups.")
    group_size = num_heads // num_kv_heads
    kind, n_units = head_units(num_heads, num_kv_heads, gqa_mode)
    if not 0 <= n_remove < n_units:
        raise ValueError(f"Cannot remove {n_remove} of {n_units} head units; keep at least one.")
    device = head_scores.device
    if kind == "slice":
        grouped = head_scores.reshape(num_kv_heads, group_size)
        order = grouped.argsort(dim=1, stable=True)[:, n_remove:]
        offsets = torch.arange(num_kv_heads, device=device)[:, None] * group_size
        keep = (order.sort(dim=1).values + offsets).reshape(-1)
        return keep, torch.arange(num_kv_heads, device=device)
    groups = head_scores.reshape(num_kv_heads, group_size).sum(1)
    if kv_scores is not None:
        groups = groups + kv_scores.to(device, groups.dtype)
    keep_kv = groups.argsort(stable=True)[n_remove:].sort().values
    keep = (keep_kv[:, None] * group_size + torch.arange(group_size, device=device)).reshape(-1)
    return keep, keep_kv


def select_neurons(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Sorted indices of the neurons to keep (the ``n_remove`` lowest scores go; ties by position)."""
    if not 0 <= n_remove < scores.numel():
        raise ValueError(f"Cannot remove {n_remove} of {scores.numel()} neurons; keep at least one.")
    return scores.argsort(stable=True)[n_remove:].sort().values


def global_removal_counts(sorted_unit_scores: Sequence[torch.Tensor], ratio: float, what: str) -> list[int]:
    """Non-uniform allocation: per-block removal counts from one global ranking.

    Each block's unit scores (ascending) are standardized within the block (z-score, as FLAP does
    per layer) so blocks of different scale compete fairly; the lowest ``ratio`` of all units are
    removed, never a block's most important unit.
    """
    total = sum(s.numel() for s in sorted_unit_scores)
    budget = int(round(ratio * total))
    candidates: list[tuple[float, int, int]] = []
    for b, scores in enumerate(sorted_unit_scores):
        s = scores.double().cpu()
        std = s.std(unbiased=False) if s.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        # Blocks whose units all score (almost) the same are neutral (z = 0), not amplified noise.
        flat = std <= 1e-6 * max(float(s.abs().max()) if s.numel() else 0.0, 1e-300)
        z = torch.zeros_like(s) if flat else (s - s.mean()) / std
        candidates.extend((float(z[r]), b, r) for r in range(s.numel() - 1))
    if budget > len(candidates):
        raise ValueError(f"{what}: ratio {ratio} removes {budget} of {total} units but every block must "
                         f"keep at least one; use a ratio of at most {_fmt(len(candidates) / total)}.")
    candidates.sort()
    counts = [0] * len(sorted_unit_scores)
    for _, b, _ in candidates[:budget]:
        counts[b] += 1
    return counts
