"""Structured pruning: physically remove attention heads and MLP neurons.

The pipeline has three parts, each usable on its own:

1. **Importance** (pure functions on tensors): :func:`magnitude_neuron_scores`,
   :func:`magnitude_head_scores`, :func:`channel_scores` (Wanda-style ``||W[:, j]||^2 * sum x_j^2``
   or FLAP's fluctuation ``||W[:, j]||^2 * var(x_j)``) and :func:`heads_from_channels`.
   Activation statistics of the inputs of ``o_proj`` / ``down_proj`` are gathered by
   :class:`ChannelStats` (see :func:`attach_channel_stats` for a ready-made set of hooks).
2. **Selection**: how many heads / neurons each block keeps (uniform or from a global ranking of
   per-block standardized scores) and which ones (:func:`select_heads`, :func:`select_neurons`).
3. **Surgery**: slicing q/k/v (or fused qkv) rows, ``o_proj`` columns, gate/up (or fused gate_up)
   rows and ``down_proj`` columns, patching the attention attributes that the modeling code reads
   at forward time, and rewriting ``model.config`` so the checkpoint reloads.

GQA rule
--------
Query head ``h`` reads key/value head ``h // group_size`` (transformers' ``repeat_kv`` layout).

* ``gqa_mode="per_group"`` (default): every KV group loses the same number of query heads, so
  ``num_key_value_heads`` is unchanged and ``num_attention_heads`` shrinks by a multiple of the
  number of KV groups. With ``uniform=True`` the ratio must remove a whole number of heads per
  group (``heads_ratio * group_size`` an integer), otherwise a ``ValueError`` lists the valid
  ratios. Which heads go is decided per group (lowest scores of that group).
* ``gqa_mode="whole_group"``: whole KV groups are removed, together with their key/value heads
  and all of their query heads (``heads_ratio * num_key_value_heads`` must be an integer in
  uniform mode).
* Multi-head attention (one query head per KV head: GPT-2, OPT, Llama without GQA) has groups of
  one, so both modes remove individual heads together with their key/value heads and any ratio
  is rounded to the nearest head count.

``head_dim`` never changes.

Saved checkpoints
-----------------
When every block ends up with the same shapes and the family's config can state them (it has a
``head_dim`` field, or no heads were removed), ``num_attention_heads`` / ``num_key_value_heads`` /
``intermediate_size`` (the family's names) and an explicit ``head_dim`` are written, and the
checkpoint reloads with stock ``AutoModelForCausalLM.from_pretrained``. Otherwise (non-uniform
shapes, or heads removed from GPT-2 / OPT / GPT-NeoX, whose modeling code derives
``head_dim = hidden // num_heads``) the per-block shapes are stored in ``config.pruned_shapes``
and the checkpoint must be loaded with :class:`AutoPrunedModelForCausalLM`; the global size
fields then keep their larger values, so a stock load fails loudly on shape mismatch instead of
silently loading a wrong model.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .architectures import (
    ArchSpec,
    Conv1D,
    get_blocks,
    get_spec,
    get_submodule,
    head_dim_configurable,
    head_dim_of,
    num_heads_of,
    num_kv_heads_of,
    weight_matrix,
)

logger = logging.getLogger(__name__)

__all__ = [
    "IMPORTANCES",
    "GQA_MODES",
    "PRUNED_SHAPES_KEY",
    "ChannelStats",
    "StructuredConfig",
    "LayerConfigView",
    "AutoPrunedModelForCausalLM",
    "attach_channel_stats",
    "channel_scores",
    "heads_from_channels",
    "magnitude_head_scores",
    "magnitude_neuron_scores",
    "head_units",
    "select_heads",
    "select_neurons",
    "removal_count",
    "global_removal_counts",
    "prune_structured",
    "apply_pruned_shapes",
]

IMPORTANCES = ("magnitude", "wanda", "fluctuation")
GQA_MODES = ("per_group", "whole_group")
PRUNED_SHAPES_KEY = "pruned_shapes"
_SHAPES_FORMAT = "hfprune.structured/1"


# --------------------------------------------------------------------------------------------
# Calibration statistics
# --------------------------------------------------------------------------------------------


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


def attach_channel_stats(model: nn.Module) -> tuple[dict[int, dict[str, ChannelStats]], Callable[[], None]]:
    """Hook a :class:`ChannelStats` onto the input of every block's ``o_proj`` and ``down_proj``.

    Returns ``(stats, remove)``: run calibration batches through ``model``, then call ``remove()``
    and pass ``stats`` to :func:`prune_structured`.
    """
    spec = get_spec(model)
    stats: dict[int, dict[str, ChannelStats]] = {}
    handles = []
    for i, block in enumerate(get_blocks(model, spec)):
        stats[i] = {}
        for key, path in (("o", spec.o), ("down", spec.down)):
            module = get_submodule(block, path)
            if module is None:
                continue
            acc = ChannelStats(weight_matrix(module).shape[1])
            stats[i][key] = acc

            def hook(_module, args, acc=acc):
                acc.add_batch(args[0])

            handles.append(module.register_forward_pre_hook(hook))

    def remove() -> None:
        for handle in handles:
            handle.remove()
        handles.clear()

    return stats, remove


# --------------------------------------------------------------------------------------------
# Importance scores (pure functions; higher = more important)
# --------------------------------------------------------------------------------------------


def magnitude_neuron_scores(row_weights: Sequence[torch.Tensor], col_weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Data-free neuron importance: squared group L2 norm of everything that belongs to neuron ``j``.

    ``row_weights`` are ``[n, *]`` matrices whose row ``j`` belongs to the neuron (gate / up),
    ``col_weights`` are ``[*, n]`` matrices whose column ``j`` does (down). The squared norm ranks
    identically to the norm and is additive over groups.
    """
    total = None
    for w in row_weights:
        part = w.detach().double().pow(2).sum(1)
        total = part if total is None else total + part.to(total.device)
    for w in col_weights:
        part = w.detach().double().pow(2).sum(0)
        total = part if total is None else total + part.to(total.device)
    if total is None:
        raise ValueError("magnitude_neuron_scores needs at least one weight matrix.")
    return total


def magnitude_head_scores(q_weight: torch.Tensor, o_weight: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Data-free head importance: squared L2 norm of the head's query rows (``q_weight`` is
    ``[num_heads * head_dim, hidden]``) and output columns (``o_weight`` is
    ``[hidden, num_heads * head_dim]``)."""
    q = q_weight.detach().double().pow(2).sum(1).view(num_heads, head_dim).sum(1)
    o = o_weight.detach().double().pow(2).sum(0).view(num_heads, head_dim).sum(1)
    return q + o.to(q.device)


def channel_scores(out_weight: torch.Tensor, stats: ChannelStats, importance: str = "wanda") -> torch.Tensor:
    """Activation-aware importance of each input channel ``j`` of ``out_weight`` (``[out, in]``).

    * ``"wanda"``: ``||W[:, j]||^2 * sum_t x_tj^2`` (Wanda's ``|W| * ||X||`` squared and summed
      over the channel's column),
    * ``"fluctuation"``: ``||W[:, j]||^2 * var_t(x_tj)`` (FLAP's fluctuation metric).
    """
    col = out_weight.detach().double().pow(2).sum(0)
    if stats.count == 0:
        raise ValueError("ChannelStats saw no tokens; run calibration batches through the model first.")
    if importance == "wanda":
        act = stats.sq_norm
    elif importance == "fluctuation":
        act = stats.var
    else:
        raise ValueError(f"channel_scores supports importance 'wanda' or 'fluctuation', not {importance!r}.")
    return col * act.to(col.device, col.dtype)


def heads_from_channels(scores: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Sum per-channel scores (``[num_heads * head_dim]``) over each head's channels."""
    return scores.reshape(num_heads, head_dim).sum(1)


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


def _unit_scores(head_scores: torch.Tensor, num_kv_heads: int, gqa_mode: str, kv_scores: torch.Tensor | None) -> torch.Tensor:
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


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class StructuredConfig:
    """Options of :func:`prune_structured`, validated on construction.

    ``heads_ratio`` / ``mlp_ratio`` are the fractions REMOVED. The optional ``num_heads``,
    ``num_kv_heads`` and ``intermediate_size`` (filled by :meth:`for_model`) let validation check
    that the ratios keep at least one head / neuron and respect GQA grouping.
    """

    heads_ratio: float = 0.0
    mlp_ratio: float = 0.0
    importance: str = "magnitude"
    uniform: bool = True
    gqa_mode: str = "per_group"
    bias_compensation: bool = False
    num_heads: int | None = field(default=None, repr=False)
    num_kv_heads: int | None = field(default=None, repr=False)
    intermediate_size: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("heads_ratio", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"{name} must be a number in [0, 1) (the fraction removed), got {value!r}.")
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value} is out of range: it is the fraction REMOVED and must be "
                                 f"in [0, 1) (0 keeps everything; 1 would remove everything).")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance={self.importance!r} is unknown; use one of {', '.join(IMPORTANCES)}.")
        if self.gqa_mode not in GQA_MODES:
            raise ValueError(f"gqa_mode={self.gqa_mode!r} is unknown; use one of {', '.join(GQA_MODES)}.")
        if self.num_heads is not None and self.heads_ratio > 0:
            n_kv = self.num_kv_heads or self.num_heads
            self.check_grouping(self.num_heads, n_kv)
            if self.uniform:
                self.head_removal(self.num_heads, n_kv, strict=True)
        if self.intermediate_size is not None and self.mlp_ratio > 0 and self.uniform:
            removal_count(self.intermediate_size, self.mlp_ratio, strict=False, what="mlp_ratio")

    def check_grouping(self, num_heads: int, num_kv_heads: int) -> None:
        """Structural checks that do not depend on the ratio's value."""
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads cannot be split into {num_kv_heads} KV groups.")
        if self.gqa_mode == "whole_group" and num_kv_heads == 1 and num_heads > 1:
            raise ValueError("gqa_mode='whole_group' cannot prune a model with a single KV head (multi-query "
                             "attention): removing its only group removes every head; use gqa_mode='per_group'.")

    def head_removal(self, num_heads: int, num_kv_heads: int, strict: bool) -> int:
        """Units to remove from a block with these head counts (see :func:`head_units`)."""
        self.check_grouping(num_heads, num_kv_heads)
        group_size = num_heads // num_kv_heads
        kind, n_units = head_units(num_heads, num_kv_heads, self.gqa_mode)
        if kind == "slice":
            what = (f"heads_ratio with gqa_mode='per_group' removes the same number of query heads from each "
                    f"of the {num_kv_heads} KV groups of {group_size} heads")
            hint = ", or gqa_mode='whole_group', or uniform=False"
        elif group_size > 1:
            what = f"heads_ratio with gqa_mode='whole_group' removes whole KV groups ({num_kv_heads} groups)"
            hint = ", or gqa_mode='per_group'"
        else:
            what, hint, strict = f"heads_ratio ({num_heads} heads)", "", False
        return removal_count(n_units, self.heads_ratio, strict=strict, what=what, hint=hint)

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs) -> "StructuredConfig":
        """Build and validate against the shapes of ``model``'s first block."""
        spec = get_spec(model)
        blocks = get_blocks(model, spec)
        n_heads, n_kv, _, inter = _block_shapes(blocks[0], spec, model.config)
        return cls(**kwargs, num_heads=n_heads if n_heads else None, num_kv_heads=n_kv or None,
                   intermediate_size=inter)


# --------------------------------------------------------------------------------------------
# Module surgery helpers
# --------------------------------------------------------------------------------------------


class LayerConfigView:
    """A model config seen by one block: a few per-block overrides (e.g. ``num_attention_heads``),
    every other read and write goes to the shared model config. Installed as the attention
    module's ``config`` when blocks differ, because some modeling code (Phi-3) reads
    ``self.config.num_attention_heads`` at forward time."""

    __slots__ = ("_base", "_overrides")

    def __init__(self, base, overrides: Mapping[str, object]):
        if isinstance(base, LayerConfigView):
            base = object.__getattribute__(base, "_base")
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", dict(overrides))

    def __getattr__(self, name):
        try:
            overrides = object.__getattribute__(self, "_overrides")
            base = object.__getattribute__(self, "_base")
        except AttributeError:
            raise AttributeError(name) from None
        if name in overrides:
            return overrides[name]
        return getattr(base, name)

    def __setattr__(self, name, value):
        if name in self._overrides:
            self._overrides[name] = value
        else:
            setattr(self._base, name, value)

    def __reduce__(self):
        return (LayerConfigView, (self._base, self._overrides))

    def __repr__(self) -> str:
        return f"LayerConfigView({type(self._base).__name__}, overrides={self._overrides})"


def _parent(block: nn.Module, path: str | None) -> nn.Module | None:
    if not path or "." not in path:
        return None
    return get_submodule(block, path.rsplit(".", 1)[0])


def _slice_linear(module: nn.Module, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None) -> None:
    """Keep only the given output rows / input columns of an ``nn.Linear`` or ``Conv1D`` in place."""
    weight = module.weight
    w = weight.data
    conv = bool(Conv1D) and isinstance(module, Conv1D)
    out_dim, in_dim = (1, 0) if conv else (0, 1)
    if out_index is not None:
        w = w.index_select(out_dim, out_index.to(w.device))
    if in_index is not None:
        w = w.index_select(in_dim, in_index.to(w.device))
    module.weight = nn.Parameter(w.contiguous(), requires_grad=weight.requires_grad)
    if out_index is not None and getattr(module, "bias", None) is not None:
        bias = module.bias
        module.bias = nn.Parameter(bias.data.index_select(0, out_index.to(bias.device)).contiguous(),
                                   requires_grad=bias.requires_grad)
    if conv:
        module.nx, module.nf = w.shape
    else:
        module.out_features, module.in_features = w.shape


def _add_zero_bias(module: nn.Module) -> None:
    if getattr(module, "bias", None) is None:
        w = module.weight
        module.bias = nn.Parameter(torch.zeros(weight_matrix(module).shape[0], dtype=w.dtype, device=w.device),
                                   requires_grad=w.requires_grad)


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


def _qkv_rows(spec: ArchSpec, part: str, heads: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """Row indices of ``part`` (q/k/v) of ``heads`` inside the fused qkv projection."""
    slot = "qkv".index(part)
    if spec.qkv_layout == "per_head":
        return (heads[:, None] * 3 * head_dim + slot * head_dim
                + torch.arange(head_dim, device=heads.device)).reshape(-1)
    if spec.qkv_layout != "concat":
        raise ValueError(f"Unknown qkv_layout {spec.qkv_layout!r} in the ArchSpec; use 'concat' or 'per_head'.")
    offset = (0, n_heads * head_dim, (n_heads + n_kv) * head_dim)[slot]
    return offset + _head_rows(heads, head_dim)


def _block_shapes(block: nn.Module, spec: ArchSpec, config) -> tuple[int, int, int, int | None]:
    """``(num_heads, num_kv_heads, head_dim, intermediate)`` of a block, read from its modules."""
    head_dim = head_dim_of(config, spec)
    o = get_submodule(block, spec.o)
    n_heads = n_kv = 0
    if o is not None:
        n_heads = weight_matrix(o).shape[1] // head_dim
        qkv = get_submodule(block, spec.qkv)
        k = get_submodule(block, spec.k)
        if qkv is not None:
            rows = weight_matrix(qkv).shape[0]
            n_kv = n_heads if spec.qkv_layout == "per_head" else (rows - n_heads * head_dim) // (2 * head_dim)
        elif k is not None:
            n_kv = weight_matrix(k).shape[0] // head_dim
        else:
            n_kv = n_heads
    down = get_submodule(block, spec.down)
    inter = weight_matrix(down).shape[1] if down is not None else None
    return n_heads, n_kv, head_dim, inter


def _q_weight(block: nn.Module, spec: ArchSpec, n_heads: int, n_kv: int, hd: int) -> torch.Tensor:
    q = get_submodule(block, spec.q)
    if q is not None:
        return weight_matrix(q)
    w = weight_matrix(get_submodule(block, spec.qkv))
    return w[_qkv_rows(spec, "q", torch.arange(n_heads, device=w.device), n_heads, n_kv, hd)]


def _kv_sq_norms(block: nn.Module, spec: ArchSpec, n_heads: int, n_kv: int, hd: int) -> torch.Tensor:
    """Squared norm of each KV head's key and value rows."""
    qkv = get_submodule(block, spec.qkv)
    if qkv is not None:
        w = weight_matrix(qkv)
        heads = torch.arange(n_kv, device=w.device)
        rows = [w[_qkv_rows(spec, p, heads, n_heads, n_kv, hd)] for p in "kv"]
    else:
        rows = [weight_matrix(get_submodule(block, p)) for p in (spec.k, spec.v)]
    return sum(r.double().pow(2).sum(1).view(n_kv, hd).sum(1) for r in rows)


def _mlp_in_weights(block: nn.Module, spec: ArchSpec, inter: int) -> list[torch.Tensor]:
    fused = get_submodule(block, spec.gate_up)
    if fused is not None:
        w = weight_matrix(fused)
        return [w[:inter], w[inter:]]
    return [weight_matrix(m) for m in (get_submodule(block, spec.gate), get_submodule(block, spec.up)) if m is not None]


def _set_attention_attrs(attn: nn.Module | None, spec: ArchSpec, n_heads: int, n_kv: int, head_dim: int,
                         per_block_config: bool) -> None:
    """Update the attributes attention modules read at forward time.

    Covers ``num_heads`` (GPT-2, OPT), ``num_key_value_groups`` (Llama family's ``repeat_kv``),
    ``num_key_value_heads`` (Phi-3 qkv split), ``split_size`` (GPT-2 qkv split) and, for
    per-block shapes, a :class:`LayerConfigView` for code that reads ``self.config`` (Phi-3).
    """
    if attn is None:
        return
    for name in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, n_heads)
    for name in ("num_key_value_heads", "num_kv_heads"):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, n_kv)
    if isinstance(getattr(attn, "num_key_value_groups", None), int):
        attn.num_key_value_groups = n_heads // n_kv
    if isinstance(getattr(attn, "split_size", None), int):
        attn.split_size = n_heads * head_dim
    config = getattr(attn, "config", None)
    if config is None:
        return
    overrides = {spec.heads_attr: n_heads}
    if spec.kv_heads_attr:
        overrides[spec.kv_heads_attr] = n_kv
    if spec.head_dim_attr:
        overrides[spec.head_dim_attr] = head_dim
    if isinstance(config, LayerConfigView):
        for key, value in overrides.items():
            config._overrides[key] = value
    elif per_block_config:
        attn.config = LayerConfigView(config, overrides)


def _set_mlp_attrs(mlp: nn.Module | None, spec: ArchSpec, inter: int, per_block_config: bool) -> None:
    if mlp is None:
        return
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = inter
    config = getattr(mlp, "config", None)
    if config is None or spec.intermediate_attr is None:
        return
    if isinstance(config, LayerConfigView):
        config._overrides[spec.intermediate_attr] = inter
    elif per_block_config:
        mlp.config = LayerConfigView(config, {spec.intermediate_attr: inter})


def _slice_attention(block: nn.Module, spec: ArchSpec, n_heads: int, n_kv: int, hd: int,
                     keep_heads: torch.Tensor, keep_kv: torch.Tensor) -> None:
    q_rows = _head_rows(keep_heads, hd)
    qkv = get_submodule(block, spec.qkv)
    if qkv is not None:
        rows = torch.cat([_qkv_rows(spec, "q", keep_heads, n_heads, n_kv, hd),
                          _qkv_rows(spec, "k", keep_kv, n_heads, n_kv, hd),
                          _qkv_rows(spec, "v", keep_kv, n_heads, n_kv, hd)]).sort().values
        _slice_linear(qkv, out_index=rows)
    else:
        kv_rows = _head_rows(keep_kv, hd)
        _slice_linear(get_submodule(block, spec.q), out_index=q_rows)
        for path in (spec.k, spec.v):
            _slice_linear(get_submodule(block, path), out_index=kv_rows)
    _slice_linear(get_submodule(block, spec.o), in_index=q_rows)


def _slice_mlp(block: nn.Module, spec: ArchSpec, inter: int, keep: torch.Tensor) -> None:
    fused = get_submodule(block, spec.gate_up)
    if fused is not None:
        _slice_linear(fused, out_index=torch.cat([keep, keep + inter]))
    for path in (spec.gate, spec.up):
        module = get_submodule(block, path)
        if module is not None:
            _slice_linear(module, out_index=keep)
    _slice_linear(get_submodule(block, spec.down), in_index=keep)


def _complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool, device=keep.device)
    mask[keep] = False
    return mask.nonzero().flatten()


def _add_bias_delta(module: nn.Module, removed: torch.Tensor, stats: ChannelStats) -> None:
    """FLAP bias compensation: ``bias += W[:, removed] @ mean(x[removed])``."""
    if removed.numel() == 0:
        return
    w = weight_matrix(module)
    mean = stats.mean.to(w.device)[removed.to(w.device)]
    delta = w.index_select(1, removed.to(w.device)).double() @ mean.double()
    module.bias.data += delta.to(module.bias.dtype)


def _ensure_output_bias(model: nn.Module, spec: ArchSpec, blocks, kind: str) -> bool:
    """Make sure every block's o_proj (``kind='attention'``) or down_proj has a bias; return
    whether compensation can proceed."""
    out_path = spec.o if kind == "attention" else spec.down
    if all(getattr(get_submodule(b, out_path), "bias", None) is not None for b in blocks):
        return True
    flag = spec.attention_bias_attr if kind == "attention" else spec.mlp_bias_attr
    if flag is None or not hasattr(model.config, flag):
        logger.warning(
            "bias_compensation skipped for %s: %s has no bias on %s and its config has no flag that "
            "would make the reloaded model create one.", kind, model.config.model_type, out_path)
        return False
    paths = spec.attention_paths() if kind == "attention" else spec.mlp_paths()
    for block in blocks:
        for path in paths:
            module = get_submodule(block, path)
            if module is not None:
                _add_zero_bias(module)
    setattr(model.config, flag, True)
    logger.info("bias_compensation: set config.%s=True and added zero biases to %s.", flag, ", ".join(paths))
    return True


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Config bookkeeping
# --------------------------------------------------------------------------------------------


def _config_rejects(config, fields: Mapping[str, object]) -> str | None:
    """Why ``config`` with ``fields`` set would fail transformers' own validation (e.g. Llama
    demands ``hidden_size % num_attention_heads == 0`` even with an explicit ``head_dim``), or
    ``None`` when it is accepted."""
    validate = getattr(config, "validate", None)
    if validate is None:
        return None
    candidate = copy.deepcopy(config)
    try:
        for key, value in fields.items():
            setattr(candidate, key, value)
        candidate.validate()
    except Exception as err:  # transformers raises its own StrictDataclass* errors
        return str(getattr(err, "__cause__", None) or err).strip().splitlines()[-1].strip()
    return None


def _write_config(model: nn.Module, spec: ArchSpec, blocks) -> str:
    """Record the new shapes in ``model.config``; returns ``"transformers"`` when stock
    ``from_pretrained`` can reload the model, ``"hfprune"`` when it needs
    :class:`AutoPrunedModelForCausalLM`."""
    config = model.config
    shapes = [_block_shapes(b, spec, config) for b in blocks]
    head_dim = shapes[0][2]
    layer_entries = [{"num_attention_heads": h, "num_key_value_heads": kv, "intermediate_size": m}
                     for h, kv, _, m in shapes]
    all_same = all(s == shapes[0] for s in shapes)
    # Families without a head_dim field derive it as hidden // num_heads, so their global head
    # counts can only describe blocks whose head counts did not change.
    heads_as_config = (shapes[0][0] == num_heads_of(config, spec)
                       and shapes[0][1] == (num_kv_heads_of(config, spec) if spec.kv_heads_attr else shapes[0][0]))
    expressible = all_same and (head_dim_configurable(spec) or spec.o is None or heads_as_config)
    if spec.head_dim_attr:
        setattr(config, spec.head_dim_attr, head_dim)
    if expressible:
        n_heads, n_kv, _, inter = shapes[0]
        fields = {}
        if spec.o is not None:
            fields[spec.heads_attr] = n_heads
            if spec.kv_heads_attr:
                fields[spec.kv_heads_attr] = n_kv
        if spec.intermediate_attr and inter is not None:
            fields[spec.intermediate_attr] = inter
        problem = _config_rejects(config, fields)
        if problem is None:
            for key, value in fields.items():
                setattr(config, key, value)
            if hasattr(config, PRUNED_SHAPES_KEY):
                delattr(config, PRUNED_SHAPES_KEY)
            return "transformers"
        logger.warning("The stock %s cannot state the pruned shapes (%s); storing them in config.%s instead, so "
                       "reload with hfprune.structured.AutoPrunedModelForCausalLM. Choose a heads_ratio that "
                       "keeps hidden_size divisible by the number of heads to get a stock checkpoint.",
                       type(config).__name__, problem, PRUNED_SHAPES_KEY)
    setattr(config, PRUNED_SHAPES_KEY, {"format": _SHAPES_FORMAT, "head_dim": head_dim, "layers": layer_entries})
    for block, (n_heads, n_kv, hd, inter) in zip(blocks, shapes):
        if spec.o is not None:
            _set_attention_attrs(_parent(block, spec.o), spec, n_heads, n_kv, hd, per_block_config=True)
        if inter is not None:
            _set_mlp_attrs(_parent(block, spec.down), spec, inter, per_block_config=True)
    return "hfprune"


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _check_stats(stats, n_blocks: int, key: str, block_index: int, in_features: int, why: str) -> ChannelStats:
    if stats is None:
        raise ValueError(f"{why} needs calibration statistics: pass stats={{block_index: {{'o': ChannelStats, "
                         f"'down': ChannelStats}}}} (collect them with hfprune.structured.attach_channel_stats), "
                         f"or use importance='magnitude' without bias_compensation.")
    entry = stats.get(block_index) if isinstance(stats, Mapping) else None
    acc = entry.get(key) if isinstance(entry, Mapping) else None
    if not isinstance(acc, ChannelStats):
        raise ValueError(f"{why}: stats[{block_index}][{key!r}] is missing; stats must hold a ChannelStats for "
                         f"'o' and 'down' of each of the {n_blocks} blocks.")
    if acc.in_features != in_features:
        raise ValueError(f"{why}: stats[{block_index}][{key!r}] has {acc.in_features} channels but the layer has "
                         f"{in_features} input features; collect statistics on the model as it is now.")
    if acc.count == 0:
        raise ValueError(f"{why}: stats[{block_index}][{key!r}] saw no tokens; run calibration data first.")
    return acc


@torch.no_grad()
def prune_structured(
    model: nn.Module,
    *,
    heads_ratio: float = 0.0,
    mlp_ratio: float = 0.0,
    importance: str = "magnitude",
    stats: Mapping[int, Mapping[str, ChannelStats]] | None = None,
    uniform: bool = True,
    gqa_mode: str = "per_group",
    bias_compensation: bool = False,
) -> dict:
    """Remove attention heads and MLP neurons from ``model`` in place.

    Args:
        heads_ratio: fraction of attention heads removed (see the GQA rule in the module doc).
        mlp_ratio: fraction of MLP neurons (intermediate channels) removed.
        importance: ``"magnitude"`` (data-free group L2 norm), ``"wanda"`` or ``"fluctuation"``
            (activation-aware; need ``stats``).
        stats: ``{block_index: {"o": ChannelStats, "down": ChannelStats}}`` of the inputs of
            o_proj / down_proj over calibration data (:func:`attach_channel_stats`).
        uniform: every block keeps the same counts; else per-block counts from a global ranking
            of per-block standardized scores (each block keeps at least one head unit / neuron).
        gqa_mode: ``"per_group"`` or ``"whole_group"``.
        bias_compensation: FLAP's bias compensation (needs ``stats``); where o_proj / down_proj
            have no bias it is created only if the config has a flag for it (Llama
            ``attention_bias`` / ``mlp_bias``, then set to True), else skipped with a warning.

    Returns:
        A report: ``params_before``, ``params_after``, ``reload_with`` (``"transformers"`` or
        ``"hfprune"``) and ``blocks`` (per block: heads/kv heads/neurons before and after, kept
        query and KV head indices, number of neurons removed).
    """
    cfg = StructuredConfig(heads_ratio=heads_ratio, mlp_ratio=mlp_ratio, importance=importance, uniform=uniform,
                           gqa_mode=gqa_mode, bias_compensation=bias_compensation)
    spec = get_spec(model)
    blocks = list(get_blocks(model, spec))
    n_blocks = len(blocks)
    shapes = [_block_shapes(b, spec, model.config) for b in blocks]
    do_heads = cfg.heads_ratio > 0
    do_mlp = cfg.mlp_ratio > 0
    if do_heads and (spec.o is None or not (spec.qkv or (spec.q and spec.k and spec.v))):
        raise ValueError(f"{model.config.model_type!r} has no attention projections in its ArchSpec; set heads_ratio=0.")
    if do_mlp and (spec.down is None or shapes[0][3] is None):
        raise ValueError(f"{model.config.model_type!r} has no MLP down projection in its ArchSpec; set mlp_ratio=0.")
    needs_stats = cfg.importance != "magnitude" or cfg.bias_compensation
    why = f"importance={cfg.importance!r}" if cfg.importance != "magnitude" else "bias_compensation=True"
    block_stats: list[dict[str, ChannelStats]] = [{} for _ in blocks]
    if needs_stats:
        for i, (n_heads, _, hd, inter) in enumerate(shapes):
            if do_heads:
                block_stats[i]["o"] = _check_stats(stats, n_blocks, "o", i, n_heads * hd, why)
            if do_mlp:
                block_stats[i]["down"] = _check_stats(stats, n_blocks, "down", i, inter, why)

    params_before = _count_params(model)

    # ---- importance -------------------------------------------------------------------------
    head_scores: list[torch.Tensor] = []
    kv_scores: list[torch.Tensor | None] = []
    neuron_scores: list[torch.Tensor] = []
    for i, (block, (n_heads, n_kv, hd, inter)) in enumerate(zip(blocks, shapes)):
        if do_heads:
            o_w = weight_matrix(get_submodule(block, spec.o))
            if cfg.importance == "magnitude":
                head_scores.append(magnitude_head_scores(_q_weight(block, spec, n_heads, n_kv, hd), o_w, n_heads, hd))
                kv_scores.append(_kv_sq_norms(block, spec, n_heads, n_kv, hd))
            else:
                ch = channel_scores(o_w, block_stats[i]["o"], cfg.importance)
                head_scores.append(heads_from_channels(ch, n_heads, hd))
                kv_scores.append(None)
        if do_mlp:
            down_w = weight_matrix(get_submodule(block, spec.down))
            if cfg.importance == "magnitude":
                neuron_scores.append(magnitude_neuron_scores(_mlp_in_weights(block, spec, inter), [down_w]))
            else:
                neuron_scores.append(channel_scores(down_w, block_stats[i]["down"], cfg.importance))

    # ---- counts -----------------------------------------------------------------------------
    head_remove = [0] * n_blocks
    mlp_remove = [0] * n_blocks
    if do_heads:
        if cfg.uniform:
            head_remove = [cfg.head_removal(h, kv, strict=True) for h, kv, _, _ in shapes]
        else:
            for h, kv, _, _ in shapes:
                cfg.check_grouping(h, kv)
            units = [_unit_scores(s, kv, cfg.gqa_mode, kvs) for s, kvs, (_, kv, _, _) in zip(head_scores, kv_scores, shapes)]
            head_remove = global_removal_counts(units, cfg.heads_ratio, "heads_ratio")
    if do_mlp:
        if cfg.uniform:
            mlp_remove = [removal_count(m, cfg.mlp_ratio, strict=False, what=f"mlp_ratio (block with {m} neurons)")
                          for _, _, _, m in shapes]
        else:
            mlp_remove = global_removal_counts([s.sort(stable=True).values for s in neuron_scores],
                                               cfg.mlp_ratio, "mlp_ratio")

    # ---- bias compensation prerequisites ----------------------------------------------------
    comp_attn = cfg.bias_compensation and do_heads and _ensure_output_bias(model, spec, blocks, "attention")
    comp_mlp = cfg.bias_compensation and do_mlp and _ensure_output_bias(model, spec, blocks, "mlp")

    # ---- surgery ----------------------------------------------------------------------------
    report_blocks = []
    for i, (block, (n_heads, n_kv, hd, inter)) in enumerate(zip(blocks, shapes)):
        entry = {"index": i, "heads_before": n_heads, "kv_heads_before": n_kv, "neurons_before": inter}
        keep_heads = torch.arange(n_heads)
        keep_kv = torch.arange(n_kv)
        if do_heads and head_remove[i] > 0:
            keep_heads, keep_kv = select_heads(head_scores[i], n_kv, head_remove[i], cfg.gqa_mode, kv_scores[i])
            keep_heads, keep_kv = keep_heads.cpu(), keep_kv.cpu()
            o = get_submodule(block, spec.o)
            if comp_attn:
                removed = _head_rows(_complement(keep_heads, n_heads), hd)
                _add_bias_delta(o, removed, block_stats[i]["o"])
            _slice_attention(block, spec, n_heads, n_kv, hd, keep_heads, keep_kv)
            _set_attention_attrs(_parent(block, spec.o), spec, len(keep_heads), len(keep_kv), hd,
                                 per_block_config=False)
        n_removed = 0
        if do_mlp and mlp_remove[i] > 0:
            keep = select_neurons(neuron_scores[i], mlp_remove[i]).cpu()
            if comp_mlp:
                _add_bias_delta(get_submodule(block, spec.down), _complement(keep, inter), block_stats[i]["down"])
            _slice_mlp(block, spec, inter, keep)
            _set_mlp_attrs(_parent(block, spec.down), spec, len(keep), per_block_config=False)
            n_removed = inter - len(keep)
        entry.update(heads_after=len(keep_heads), kv_heads_after=len(keep_kv),
                     neurons_after=None if inter is None else inter - n_removed,
                     kept_heads=keep_heads.tolist(), kept_kv_heads=keep_kv.tolist(), neurons_removed=n_removed)
        report_blocks.append(entry)

    if do_heads or do_mlp:
        reload_with = _write_config(model, spec, blocks)
    else:
        reload_with = "hfprune" if hasattr(model.config, PRUNED_SHAPES_KEY) else "transformers"
    if reload_with == "hfprune":
        logger.info("Per-block shapes stored in config.%s; reload with "
                    "hfprune.structured.AutoPrunedModelForCausalLM.from_pretrained.", PRUNED_SHAPES_KEY)
    params_after = _count_params(model)
    logger.info("Structured pruning: %d -> %d parameters (%.1f%% removed).", params_before, params_after,
                100.0 * (params_before - params_after) / max(params_before, 1))
    return {
        "importance": cfg.importance,
        "uniform": cfg.uniform,
        "gqa_mode": cfg.gqa_mode,
        "heads_ratio": cfg.heads_ratio,
        "mlp_ratio": cfg.mlp_ratio,
        "bias_compensation": {"attention": bool(comp_attn), "mlp": bool(comp_mlp)},
        "params_before": params_before,
        "params_after": params_after,
        "reload_with": reload_with,
        "blocks": report_blocks,
    }


# --------------------------------------------------------------------------------------------
# Loading checkpoints with per-block shapes
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def apply_pruned_shapes(model: nn.Module) -> nn.Module:
    """Resize a freshly built model's blocks to ``config.pruned_shapes`` (weights are not
    meaningful afterwards: load the checkpoint into it). Works on the meta device."""
    shapes = getattr(model.config, PRUNED_SHAPES_KEY, None)
    if not shapes:
        return model
    if not isinstance(shapes, Mapping) or not isinstance(shapes.get("layers"), list):
        raise ValueError(f"config.{PRUNED_SHAPES_KEY} must be a dict with a 'layers' list (written by "
                         f"hfprune.structured.prune_structured); got {shapes!r}.")
    spec = get_spec(model)
    blocks = list(get_blocks(model, spec))
    if len(shapes["layers"]) != len(blocks):
        raise ValueError(f"config.{PRUNED_SHAPES_KEY} describes {len(shapes['layers'])} blocks but the model has "
                         f"{len(blocks)}; the config does not belong to this checkpoint.")
    for block, target in zip(blocks, shapes["layers"]):
        n_heads, n_kv, hd, inter = _block_shapes(block, spec, model.config)
        t_heads = int(target.get("num_attention_heads", n_heads))
        t_kv = int(target.get("num_key_value_heads", n_kv))
        t_inter = target.get("intermediate_size", inter)
        if spec.o is not None and (t_heads, t_kv) != (n_heads, n_kv):
            if t_heads > n_heads or t_kv > n_kv:
                raise ValueError(f"config.{PRUNED_SHAPES_KEY} asks for {t_heads} heads / {t_kv} KV heads but the "
                                 f"config builds only {n_heads} / {n_kv}.")
            _slice_attention(block, spec, n_heads, n_kv, hd, torch.arange(t_heads), torch.arange(t_kv))
        if spec.o is not None:
            _set_attention_attrs(_parent(block, spec.o), spec, t_heads, t_kv, hd, per_block_config=True)
        if t_inter is not None and inter is not None:
            t_inter = int(t_inter)
            if t_inter != inter:
                if t_inter > inter:
                    raise ValueError(f"config.{PRUNED_SHAPES_KEY} asks for {t_inter} MLP neurons but the config "
                                     f"builds only {inter}.")
                _slice_mlp(block, spec, inter, torch.arange(t_inter))
            _set_mlp_attrs(_parent(block, spec.down), spec, t_inter, per_block_config=True)
    return model


_PRUNED_CLASSES: dict[type, type] = {}


def _pruned_class(cls: type) -> type:
    """A subclass of ``cls`` that resizes its blocks to ``config.pruned_shapes`` right after
    construction, so transformers' own ``from_pretrained`` (meta-device init, safetensors
    loading, dtype/device_map handling, weight tying) loads the smaller tensors."""
    if cls not in _PRUNED_CLASSES:
        def __init__(self, config, *args, **kwargs):
            cls.__init__(self, config, *args, **kwargs)
            apply_pruned_shapes(self)

        # Same name as the stock class so save_pretrained keeps the stock "architectures" entry.
        _PRUNED_CLASSES[cls] = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                                           "__qualname__": cls.__qualname__})
    return _PRUNED_CLASSES[cls]


class AutoPrunedModelForCausalLM:
    """Load checkpoints written after :func:`prune_structured`.

    Checkpoints without ``config.pruned_shapes`` load exactly like
    ``AutoModelForCausalLM.from_pretrained``. Otherwise the stock model class for the config is
    built on the meta device, resized per block, and the safetensors weights are loaded into it
    (``use_safetensors=True``; no pickle, no remote code).
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("Use AutoPrunedModelForCausalLM.from_pretrained(path) or .from_config(config).")

    @staticmethod
    def _model_class(config) -> type:
        from transformers import AutoModelForCausalLM

        mapping = AutoModelForCausalLM._model_mapping
        try:
            return mapping[type(config)]
        except KeyError:
            raise ValueError(f"No causal-LM class is registered in transformers for config {type(config).__name__}.") from None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        from transformers import AutoConfig, AutoModelForCausalLM

        if kwargs.get("trust_remote_code"):
            raise ValueError("AutoPrunedModelForCausalLM does not run remote code; drop trust_remote_code.")
        config = kwargs.pop("config", None)
        if config is None:
            config_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only",
                                                    "subfolder") if k in kwargs}
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
        if not getattr(config, PRUNED_SHAPES_KEY, None):
            return AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)
        kwargs.setdefault("use_safetensors", True)
        model_cls = _pruned_class(cls._model_class(config))
        return model_cls.from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):
        """Build a randomly initialised model with the per-block shapes of ``config``."""
        from transformers import AutoModelForCausalLM

        if not getattr(config, PRUNED_SHAPES_KEY, None):
            return AutoModelForCausalLM.from_config(config, **kwargs)
        return _pruned_class(cls._model_class(config))._from_config(config, **kwargs)
