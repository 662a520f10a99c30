"""Mask selection: pure functions from importance scores to boolean "pruned" masks.

Every function takes a score tensor (higher = more important, keep) and returns a boolean
tensor of the same shape that is ``True`` where the weight is pruned (set to zero).

Counts are exact: masks are chosen by top-k / sorting (exactly k entries, ties broken
deterministically), never by comparing against a threshold, because weights that come from a quantization grid
(GGUF, int4) have many equal magnitudes and ``score <= threshold`` would over-prune.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = [
    "Pattern",
    "parse_pattern",
    "prune_count",
    "unstructured_mask",
    "row_mask",
    "layer_mask",
    "nm_mask",
    "select_mask",
    "check_nm",
]

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: ``unstructured`` or ``N:M`` (at most N non-zeros in every M
    consecutive weights of a row along the input dimension)."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (``1 - N/M``); ``None`` for unstructured."""
        return 1.0 - self.n / self.m if self.is_nm else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """Parse ``"unstructured"`` or ``"N:M"`` into a :class:`Pattern`.

    Raises:
        ValueError: for anything else, or for N:M with ``N >= M`` or ``N < 1``.
    """
    if isinstance(pattern, Pattern):
        return pattern
    if pattern is None or str(pattern).strip().lower() in ("unstructured", "none", ""):
        return Pattern()
    match = _NM_RE.match(str(pattern))
    if not match:
        raise ValueError(
            f"Unknown sparsity pattern {pattern!r}: use 'unstructured' or 'N:M' such as '2:4' or '4:8'."
        )
    n, m = int(match.group(1)), int(match.group(2))
    if n < 1 or n >= m:
        raise ValueError(
            f"Invalid N:M pattern {pattern!r}: N is the number of weights kept in each group of M, "
            f"so it needs 1 <= N < M (for example '2:4')."
        )
    return Pattern(n, m)


def prune_count(numel: int, sparsity: float) -> int:
    """Number of weights to prune so that ``count / numel`` is ``sparsity`` to within ``1/numel``."""
    return int(round(sparsity * numel))


def _lowest(score: torch.Tensor, k: int, dim: int = -1, sorted: bool = False):
    """The ``k`` lowest entries along ``dim`` (exactly ``k``, ties broken deterministically)."""
    return torch.topk(score, k, dim=dim, largest=False, sorted=sorted)


def lowest_k_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of exactly ``k`` lowest entries of ``score`` (any shape), in no particular order.

    Ties at the cut are broken deterministically (same input, same answer). On CPU this is a
    selection (numpy ``argpartition``, linear time), many times faster than a full sort for the
    hundred-thousand-entry blocks SparseGPT and layer-scope masks select from; elsewhere it is
    ``torch.topk``.
    """
    flat = score.detach().reshape(-1)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    if k >= flat.numel():
        return torch.arange(flat.numel(), device=score.device)
    if flat.device.type == "cpu":
        values = flat.float().contiguous().numpy()
        return torch.from_numpy(values.argpartition(k - 1)[:k].astype("int64"))
    return torch.topk(flat.float(), k, largest=False, sorted=False).indices


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``sparsity`` fraction of lowest-scored entries of the whole tensor."""
    return lowest_k_mask(score, prune_count(score.numel(), sparsity))


def lowest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` lowest entries of ``score`` (selection, exact count)."""
    pruned = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        pruned[lowest_k_indices(score, k)] = True
    return pruned.view_as(score)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scored entries of every output row (Wanda's per-output comparison group).

    Every row loses ``floor(k / rows)`` entries; the ``k mod rows`` remaining prunes go to the
    rows whose next candidate has the lowest score, so the matrix total is exact.
    """
    rows, cols = score.shape
    k = prune_count(score.numel(), sparsity)
    pruned = torch.zeros_like(score, dtype=torch.bool)
    if k == 0:
        return pruned
    base, extra = divmod(k, rows)
    score = score.float()
    if extra == 0:
        pruned.scatter_(1, _lowest(score, base, dim=1).indices, True)
        return pruned
    values, order = _lowest(score, base + 1, dim=1, sorted=True)
    per_row = torch.full((rows,), base, dtype=torch.long, device=score.device)
    chosen = torch.sort(values[:, base], stable=True).indices[:extra]
    per_row[chosen] += 1
    ranks = torch.arange(base + 1, device=score.device).expand(rows, base + 1)
    pruned.scatter_(1, order, ranks < per_row[:, None])
    return pruned


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest-scored entries in every group of ``m`` consecutive columns."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(
            f"N:M pattern {n}:{m} needs the input width to be a multiple of {m}, but it is {cols}; "
            f"exclude this layer or choose an M that divides {cols}."
        )
    groups = score.float().reshape(rows, cols // m, m)
    pruned = torch.zeros_like(groups, dtype=torch.bool)
    pruned.scatter_(-1, _lowest(groups, m - n, dim=-1).indices, True)
    return pruned.reshape(rows, cols)


def unstructured_mask(score: torch.Tensor, sparsity: float, scope: str = "row") -> torch.Tensor:
    """Unstructured mask with the given comparison ``scope`` (``row`` or ``layer``)."""
    if scope == "row":
        return row_mask(score, sparsity)
    if scope in ("layer", "global"):
        # ``global`` scope arrives here with the layer's share of the global budget.
        return layer_mask(score, sparsity)
    raise ValueError(f"Unknown scope {scope!r}: use 'row', 'layer' or 'global'.")


def select_mask(score: torch.Tensor, sparsity: float, pattern: str | Pattern = "unstructured",
                scope: str = "row") -> torch.Tensor:
    """Boolean pruned-mask for a 2-D ``score`` ([out_features, in_features])."""
    pat = parse_pattern(pattern)
    if pat.is_nm:
        return nm_mask(score, pat.n, pat.m)
    return unstructured_mask(score, sparsity, scope)


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs of every row has at most ``n`` non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    nonzero = (weight.reshape(rows, cols // m, m) != 0).sum(-1)
    return bool((nonzero <= n).all())


def global_budgets(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, int]:
    """Split one global prune budget across layers: the ``round(sparsity * total)`` lowest scores
    over all tensors together, returned as the number to prune in each tensor.

    Ties at the cut are broken by position in the order the tensors are given, so the total is
    exact. Memory: one float32 copy of all scores.
    """
    names = list(scores)
    sizes = [scores[n].numel() for n in names]
    total = sum(sizes)
    k = prune_count(total, sparsity)
    if k == 0:
        return {n: 0 for n in names}
    flat = torch.cat([scores[n].reshape(-1).float().cpu() for n in names])
    order = torch.sort(flat, stable=True).indices[:k]
    counts = torch.bincount(torch.bucketize(order, torch.tensor(list(_cumsum(sizes))), right=True),
                            minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts.tolist())}


def _cumsum(sizes: list[int]):
    acc = 0
    for s in sizes[:-1]:
        acc += s
        yield acc
