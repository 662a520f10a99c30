"""Non-uniform per-layer sparsity: OWL allocation and explicit per-layer specs.

OWL: L. Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for
Pruning LLMs to High Sparsity", ICML 2024 (arXiv:2310.05175). Decoder blocks that hold more
"outliers" of the Wanda score ``|W_ij| * ||X_j||`` get a lower sparsity, blocks with fewer
get a higher one, inside ``[target - lambda, target + lambda]`` and with the overall sparsity
kept at the target.

All functions are pure (numbers and tensors in, numbers out).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = ["outlier_ratio", "owl_sparsities", "expand_layer_sparsity"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# OWL
# --------------------------------------------------------------------------------------------


def outlier_ratio(scores: torch.Tensor | Sequence[torch.Tensor], m: float = 5.0,
                  per_layer_mean: bool = True) -> float:
    """Layerwise Outlier Distribution (LOD) of one decoder block: the fraction of score entries
    larger than ``m`` times the mean score.

    Args:
        scores: the already computed outlier scores ``|W| * ||X||`` of one layer, or a list with
            one tensor per linear layer of the block.
        m: outlier threshold multiplier (the paper's ``M``, 5 by default; 3-10 are common).
        per_layer_mean: with several tensors, ``True`` (default) compares every tensor against
            its *own* mean and aggregates the outlier counts weighted by element count, i.e.
            ``sum_l count_l / sum_l numel_l``. Layers such as ``down_proj`` see inputs on a
            different scale than ``q_proj``, and a shared mean would let one of them dominate.
            ``False`` reproduces the OWL reference code: one mean over all entries of the block.

    Returns:
        A fraction in ``[0, 1]``.
    """
    tensors = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    if not tensors:
        raise ValueError("outlier_ratio needs at least one score tensor.")
    if not m > 0:
        raise ValueError(f"The outlier multiplier m must be positive, got {m}.")
    tensors = [t.detach().reshape(-1).double() for t in tensors]
    total = sum(t.numel() for t in tensors)
    if total == 0:
        raise ValueError("outlier_ratio got only empty score tensors.")
    if per_layer_mean:
        outliers = sum(int((t > m * t.mean()).sum()) for t in tensors if t.numel())
    else:
        mean = sum(float(t.sum()) for t in tensors) / total
        outliers = sum(int((t > m * mean).sum()) for t in tensors)
    return outliers / total


def _shift_to_mean(values: list[float], weights: list[float], target: float, lo: float,
                   hi: float) -> list[float]:
    """Find ``c`` with ``sum_i w_i clip(v_i + c, lo, hi) / sum_i w_i == target`` and return the
    clipped values. The left side is continuous and non-decreasing in ``c``; bisection brackets
    the solution, then the shift of the unclipped entries is solved exactly."""
    total = sum(weights)

    def clipped(c: float) -> list[float]:
        return [min(hi, max(lo, v + c)) for v in values]

    def mean(c: float) -> float:
        return sum(w * v for w, v in zip(weights, clipped(c))) / total

    a = lo - max(values) - 1.0
    b = hi - min(values) + 1.0
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mean(mid) < target:
            a = mid
        else:
            b = mid
    c = 0.5 * (a + b)
    result = clipped(c)
    free = [i for i, r in enumerate(result) if lo < r < hi]
    if free:
        fixed_sum = sum(weights[i] * result[i] for i in range(len(values)) if i not in set(free))
        free_w = sum(weights[i] for i in free)
        free_v = sum(weights[i] * values[i] for i in free)
        c_exact = (target * total - fixed_sum - free_v) / free_w
        candidate = clipped(c_exact)
        if abs(sum(w * v for w, v in zip(weights, candidate)) / total - target) <= abs(
                mean(c) - target):
            result = candidate
    return result


def owl_sparsities(ratios: Sequence[float], param_counts: Sequence[int], target: float,
                   lam: float = 0.08, min_sparsity: float = 0.0,
                   max_sparsity: float = 0.99) -> list[float]:
    """OWL per-block sparsities from per-block outlier ratios (Sec. 4 of the paper).

    1. Linear map: the block with the highest outlier ratio gets ``target - lam``, the lowest
       gets ``target + lam``, the others in between (``S_i = 1 - D_i`` with ``D_i`` rescaled
       into ``[0, 2 lam]``). Equal ratios give every block ``target``.
    2. Shift all values by one constant so the parameter-weighted mean
       ``sum_i p_i S_i / sum_i p_i`` equals ``target`` (the reference code shifts the plain mean;
       weighting by ``param_counts`` makes the model-level sparsity exact when blocks differ
       in size).
    3. If a value leaves ``[min_sparsity, max_sparsity]``, clip it and move the shift of the
       unclipped blocks so the weighted mean is still exactly ``target`` (water filling), which
       keeps the order of the blocks.

    Args:
        ratios: outlier ratio of every decoder block (:func:`outlier_ratio`).
        param_counts: prunable parameters of every block (weights of the weighted mean).
        target: desired overall sparsity, in ``[0, 1)``.
        lam: half-width ``lambda`` of the sparsity range (paper: 0.02-0.1; 0.08 for LLaMA).
        min_sparsity, max_sparsity: clipping range inside ``[0, 1)``.

    Returns:
        One sparsity per block, whose ``param_counts``-weighted mean is ``target`` to ~1e-12.

    Raises:
        ValueError: on mismatched lengths, bad values, or when ``target`` cannot be reached
            inside ``[min_sparsity, max_sparsity]``.
    """
    ratios = [float(r) for r in ratios]
    counts = [float(p) for p in param_counts]
    if not ratios:
        raise ValueError("owl_sparsities needs at least one block.")
    if len(ratios) != len(counts):
        raise ValueError(
            f"Got {len(ratios)} outlier ratios but {len(counts)} parameter counts; give one of each "
            f"per decoder block."
        )
    if not all(math.isfinite(r) for r in ratios):
        raise ValueError(f"Outlier ratios must be finite numbers, got {ratios}.")
    if any(p <= 0 or not math.isfinite(p) for p in counts):
        raise ValueError("Every block needs a positive parameter count.")
    if not 0.0 <= min_sparsity < max_sparsity < 1.0:
        raise ValueError(
            f"Need 0 <= min_sparsity < max_sparsity < 1, got {min_sparsity} and {max_sparsity}."
        )
    if not 0.0 <= target < 1.0:
        raise ValueError(f"Target sparsity must be in [0, 1), got {target}; use e.g. 0.5 for 50%.")
    if not min_sparsity <= target <= max_sparsity:
        raise ValueError(
            f"Target sparsity {target} is outside the allowed per-block range "
            f"[{min_sparsity}, {max_sparsity}]; widen min_sparsity/max_sparsity or change the target."
        )
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"OWL lambda must be a non-negative number, got {lam}.")

    lo_r, hi_r = min(ratios), max(ratios)
    if hi_r > lo_r:
        values = [target + lam - 2.0 * lam * (r - lo_r) / (hi_r - lo_r) for r in ratios]
    else:
        values = [float(target)] * len(ratios)

    total = sum(counts)
    shift = target - sum(p * v for p, v in zip(counts, values)) / total
    values = [v + shift for v in values]
    if min(values) < min_sparsity or max(values) > max_sparsity:
        logger.info("OWL: clipping block sparsities to [%g, %g] and re-balancing the mean.",
                    min_sparsity, max_sparsity)
        values = _shift_to_mean(values, counts, target, min_sparsity, max_sparsity)

    mean = sum(p * v for p, v in zip(counts, values)) / total
    if abs(mean - target) > 1e-9:
        raise ValueError(
            f"OWL could not reach the target sparsity {target} (got {mean}) inside "
            f"[{min_sparsity}, {max_sparsity}]; lower lam or widen the range."
        )
    return values


# --------------------------------------------------------------------------------------------
# Explicit per-layer specs
# --------------------------------------------------------------------------------------------


def _check_value(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Sparsity for {where} is {value!r}; use a number in [0, 1), e.g. 0.5.")
    v = float(value)
    if not (0.0 <= v < 1.0):
        hint = f" (if you meant {v:g}%, write {v / 100:g})" if 1.0 < v <= 100.0 else ""
        raise ValueError(
            f"Sparsity for {where} is {v:g}; it must be a fraction in [0, 1), e.g. 0.5 for 50%"
            f"{hint}. A value of 1 would delete the whole layer."
        )
    return v


def expand_layer_sparsity(
    spec: float | Sequence[float] | Mapping[object, float],
    names: Sequence[str],
    block_of: Callable[[str], int | None] | Mapping[str, int | None],
) -> dict[str, float]:
    """Turn a user's per-layer sparsity spec into ``{module_name: sparsity}``.

    Args:
        spec: one of
            * a number: every module in ``names`` gets it;
            * a list of numbers, one per decoder block (``spec[b]`` for every module of block
              ``b``); its length must equal the number of blocks;
            * a dict whose keys are block indices (``int``, or a string of digits as YAML/JSON
              produce) or regular expressions searched (``re.search``) in module names. The
              first matching key in the dict's order wins; modules that no key matches are
              left out of the result (the caller's default applies).
        names: the prunable module names.
        block_of: maps a module name to its decoder-block index (``None`` for modules outside
            the blocks); a function or a dict.

    Raises:
        ValueError: for values outside ``[0, 1)``, a list of the wrong length, a block index
            that does not exist, an invalid regex, or a key that matches no module.
    """
    lookup = block_of.get if isinstance(block_of, Mapping) else block_of
    blocks = {name: lookup(name) for name in names}
    present = sorted({b for b in blocks.values() if b is not None})
    n_blocks = present[-1] + 1 if present else 0

    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        v = _check_value(spec, "all layers")
        return {name: v for name in names}

    if isinstance(spec, Mapping):
        rules: list[tuple[object, object, float]] = []
        for key, value in spec.items():
            if isinstance(key, bool):
                raise ValueError(f"Per-layer sparsity key {key!r} is neither a block index nor a regex.")
            if isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit()):
                index = int(key)
                if index not in present:
                    raise ValueError(
                        f"Per-layer sparsity key {key!r} names decoder block {index}, but the model's "
                        f"blocks are 0..{n_blocks - 1}; use an index in that range."
                    )
                rules.append((key, index, _check_value(value, f"block {index}")))
            elif isinstance(key, str):
                try:
                    regex = re.compile(key)
                except re.error as exc:
                    raise ValueError(f"Per-layer sparsity key {key!r} is not a valid regex: {exc}.") from exc
                if not any(regex.search(name) for name in names):
                    example = names[0] if names else "<none>"
                    raise ValueError(
                        f"Per-layer sparsity key {key!r} matches no prunable module; module names look "
                        f"like {example!r}. Fix the pattern or remove the key."
                    )
                rules.append((key, regex, _check_value(value, f"modules matching {key!r}")))
            else:
                raise ValueError(
                    f"Per-layer sparsity key {key!r} must be a block index (int) or a regex (str)."
                )
        result: dict[str, float] = {}
        for name in names:
            for _, matcher, value in rules:
                if isinstance(matcher, int):
                    hit = blocks[name] == matcher
                else:
                    hit = matcher.search(name) is not None
                if hit:
                    result[name] = value
                    break
        return result

    if isinstance(spec, Sequence) and not isinstance(spec, str):
        values = [_check_value(v, f"block {i}") for i, v in enumerate(spec)]
        if len(values) != n_blocks:
            raise ValueError(
                f"The per-layer sparsity list has {len(values)} values but the model has {n_blocks} "
                f"decoder blocks; give exactly one value per block."
            )
        return {name: values[b] for name, b in blocks.items() if b is not None}

    raise ValueError(
        f"Per-layer sparsity spec must be a number, a list (one value per block) or a dict "
        f"(block index or regex -> sparsity), got {type(spec).__name__}."
    )
