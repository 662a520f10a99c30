"""Structured pruning: physically remove attention heads and MLP neurons.

The pipeline has three parts, each usable on its own:

1. **Importance** (pure functions on tensors): :func:`magnitude_neuron_scores`,
   :func:`magnitude_head_scores`, :func:`channel_scores` (Wanda-style ``||W[:, j]||^2 * sum x_j^2``
   or FLAP's fluctuation ``||W[:, j]||^2 * var(x_j)``) and :func:`heads_from_channels`.
   Activation statistics of the inputs of ``o_proj`` / ``down_proj`` are gathered by
   :class:`ChannelStats` (see :func:`attach_channel_stats` for a ready-made set of hooks).
2. **Selection**: which blocks lose heads / neurons (``targets`` / ``ignore`` regexes over their
   ``o_proj`` / ``down_proj`` names, as the layer-wise methods match layer names: :func:`selected_blocks`),
   how many each selected block loses (uniform or from a global ranking of per-block standardized
   scores over the selected blocks) and which ones (:func:`select_heads`, :func:`select_neurons`).
3. **Surgery**: slicing q/k/v (or fused qkv) rows, ``o_proj`` columns, gate/up (or fused gate_up)
   rows and ``down_proj`` columns, patching the attention attributes that the modeling code reads
   at forward time, and rewriting ``model.config`` so the checkpoint reloads.

4. **Compensation** (``compensation="lstsq"``, the default whenever the importance reads data):
   :func:`hfprune.prune` then runs block by block on the activations of the already pruned
   blocks (:mod:`hfprune.structured.sequential`): the moments of the ``o_proj`` input are
   gathered, heads are chosen, the kept ``o_proj`` columns (and its bias, if any) are re-fitted by
   least squares to reproduce the layer's output on the calibration inputs
   (:func:`hfprune.solvers.lstsq.lstsq_fit`; with ``dense_targets`` to the dense model's outputs), then the same for ``down_proj`` on the block
   with its attention already pruned. ``importance="obs"`` (the default) chooses the heads /
   neurons by the error left after that re-fit, greedily (ZipLM, SlimGPT:
   :func:`hfprune.solvers.structured.greedy_remove`). :func:`prune_structured` is the one-pass,
   uncompensated version on statistics of the dense model.

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

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import torch
from torch import nn

from hfprune.config import ConfigDictMixin, check_field_types, check_name_regexes, renamed, resolve_renamed
from hfprune.core.calibration import calibration_batch_size
from hfprune.core.runner import LayerRunner, is_offloaded
from hfprune.core.targets import name_matches
from hfprune.methods.base import DENSE_TARGETS, ModelPruner, dense_targets_field
from hfprune.registry import register_pruner
from hfprune.arch import get_blocks, get_spec, get_submodule, weight_matrix
from hfprune.stats import ChannelStats
from hfprune.structured.checkpoint import PRUNED_SHAPES_KEY, write_config
from hfprune.structured.importance import attach_channel_stats, channel_scores, heads_from_channels, magnitude_head_scores, magnitude_neuron_scores
from hfprune.structured.selection import (global_removal_counts, head_units, removal_count, select_heads, select_neurons,
                                          unit_scores)
from hfprune.structured.surgery import (add_bias_delta, block_report, block_shapes, complement, count_params,
                                        ensure_output_bias, head_rows, kv_sq_norms, mlp_in_weights, q_weight,
                                        shrink_block)

logger = logging.getLogger(__name__)

IMPORTANCES = ("obs", "magnitude", "wanda", "fluctuation")
GQA_MODES = ("per_group", "whole_group")
COMPENSATIONS = ("auto", "lstsq", "none")
_OLD_TARGETS = {"pruned": "off", "dense": "model"}  # compensation_target's values -> dense_targets'


@dataclass
class StructuredConfig(ConfigDictMixin):
    """Options of :func:`prune_structured`, validated on construction.

    ``heads_ratio`` / ``mlp_ratio`` are the fractions REMOVED. The optional ``num_heads``,
    ``num_kv_heads`` and ``intermediate_size`` (filled by :meth:`for_model`) let validation check
    that the ratios keep at least one head / neuron and respect GQA grouping.
    """

    method: ClassVar[str] = "structured"

    heads_ratio: float = field(default=0.0, metadata={"help": "Fraction of attention heads removed."})
    mlp_ratio: float = field(default=0.0, metadata={"help": "Fraction of MLP neurons removed."})
    importance: str = field(default="obs", metadata={
        "help": "obs (greedy structured OBS on the layer's input Hessian: ZipLM/SlimGPT), magnitude (data-free), "
                "wanda or fluctuation (FLAP).", "choices": IMPORTANCES})
    uniform: bool = field(default=True, metadata={"help": "Every block keeps the same counts (else a global ranking)."})
    gqa_mode: str = field(default="per_group", metadata={
        "help": "Structured heads with GQA: equal query heads per KV group, or whole KV groups.", "choices": GQA_MODES})
    bias_compensation: bool = field(default=False, metadata={
        "help": "Structured: FLAP bias compensation for removed channels (with compensation=lstsq the bias is "
                "re-fitted with the weights)."})
    compensation: str = field(default="auto", metadata={
        "help": "Structured: after removing heads/neurons, re-fit the kept o_proj/down_proj columns by least squares "
                "on the calibration inputs, block by block (lstsq), or not (none); auto = lstsq unless "
                "importance=magnitude (data-free).", "choices": COMPENSATIONS})
    dense_targets: str = dense_targets_field("off")
    dampening: float = field(default=0.01, metadata={
        "help": "Structured compensation / obs: ridge on the input Hessian, as a fraction of its mean diagonal."})
    targets: list[str] = field(default_factory=lambda: [r".*"], metadata={
        "help": "Regexes (full match) over each block's attention output and MLP down projection names, "
                "full (model.layers.3.mlp.down_proj) or in-block (mlp.down_proj): a block loses heads only where "
                "its o_proj matches, neurons only where its down_proj matches."})
    ignore: list[str] = field(default_factory=list, metadata={
        "help": "Regexes over the same names whose heads / neurons stay whole; wins over targets (e.g. "
                "'model\\.layers\\.(0|1|29)\\..*' leaves blocks 0, 1 and 29 whole, as LLM-Pruner does with the "
                "first and last blocks)."})
    compensation_target: str | None = renamed("dense_targets")
    damp: float | None = renamed("dampening")
    num_heads: int | None = field(default=None, repr=False)
    num_kv_heads: int | None = field(default=None, repr=False)
    intermediate_size: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.compensation_target is not None and self.compensation_target not in (*_OLD_TARGETS, *DENSE_TARGETS):
            raise ValueError(f"compensation_target={self.compensation_target!r} is unknown; it is now dense_targets, "
                             f"one of {', '.join(DENSE_TARGETS)}.")
        self.compensation_target = _OLD_TARGETS.get(self.compensation_target, self.compensation_target)
        resolve_renamed(self)
        for name in ("heads_ratio", "mlp_ratio"):  # the amounts first: their message names the range
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"{name} must be a number in [0, 1) (the fraction removed), got {value!r}.")
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value} is out of range: it is the fraction REMOVED and must be "
                                 f"in [0, 1) (0 keeps everything; 1 would remove everything).")
        check_field_types(self)
        check_name_regexes(self)
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance={self.importance!r} is unknown; use one of {', '.join(IMPORTANCES)}.")
        if self.compensation not in COMPENSATIONS:
            raise ValueError(f"compensation={self.compensation!r} is unknown; use one of {', '.join(COMPENSATIONS)}.")
        if self.dense_targets not in DENSE_TARGETS:
            raise ValueError(f"dense_targets={self.dense_targets!r} is unknown; use one of "
                             f"{', '.join(DENSE_TARGETS)}.")
        if isinstance(self.dampening, bool) or not isinstance(self.dampening, (int, float)) or \
                not 0 <= self.dampening < 10:
            raise ValueError(f"dampening={self.dampening!r} must be a number in [0, 10) (a fraction of the mean "
                             f"Hessian diagonal; 0.01 is the usual value).")
        if self.importance == "obs" and self.compensation == "none":
            raise ValueError("importance='obs' chooses heads/neurons by the error left after the least-squares "
                             "update, so it needs compensation='lstsq' (or 'auto'); for an uncompensated "
                             "data-driven choice use importance='wanda' or 'fluctuation'.")
        if self.gqa_mode not in GQA_MODES:
            raise ValueError(f"gqa_mode={self.gqa_mode!r} is unknown; use one of {', '.join(GQA_MODES)}.")
        if self.num_heads is not None and self.heads_ratio > 0:
            n_kv = self.num_kv_heads or self.num_heads
            self.check_grouping(self.num_heads, n_kv)
            if self.uniform:
                self.head_removal(self.num_heads, n_kv, strict=True)
        if self.intermediate_size is not None and self.mlp_ratio > 0 and self.uniform:
            removal_count(self.intermediate_size, self.mlp_ratio, strict=False, what="mlp_ratio")

    @property
    def resolved_compensation(self) -> str:
        """``"lstsq"`` or ``"none"`` (``"auto"``: least squares whenever the importance reads data)."""
        if self.compensation == "auto":
            return "none" if self.importance == "magnitude" else "lstsq"
        return self.compensation

    @property
    def sequential(self) -> bool:
        """Block by block on the pruned model's activations (compensation), or one dense pass."""
        return self.resolved_compensation == "lstsq"

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
        n_heads, n_kv, _, inter = block_shapes(blocks[0], spec, model.config)
        return cls(**kwargs, num_heads=n_heads if n_heads else None, num_kv_heads=n_kv or None,
                   intermediate_size=inter)


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


def check_prunable(model: nn.Module, spec, cfg: StructuredConfig, shapes) -> None:
    """The layers ``cfg`` prunes exist in the ArchSpec (a clear error before any work)."""
    if cfg.heads_ratio > 0 and (spec.o is None or not (spec.qkv or (spec.q and spec.k and spec.v))):
        raise ValueError(f"{model.config.model_type!r} has no attention projections in its ArchSpec; set heads_ratio=0.")
    if cfg.mlp_ratio > 0 and (spec.down is None or shapes[0][3] is None):
        raise ValueError(f"{model.config.model_type!r} has no MLP down projection in its ArchSpec; set mlp_ratio=0.")


def selected_blocks(cfg: StructuredConfig, spec, n_blocks: int) -> tuple[list[bool], list[bool]]:
    """Per block, whether ``cfg`` removes its heads and its MLP neurons: ``cfg.heads_ratio`` / ``cfg.mlp_ratio``
    are set and the block's attention output / MLP down projection name (full or in-block) matches
    ``cfg.targets`` and not ``cfg.ignore``. Raises when a ratio is set but no block is selected for it."""
    def chosen(rel: str | None, ratio: float, what: str, flag: str) -> list[bool]:
        if ratio <= 0 or rel is None:
            return [False] * n_blocks
        names = [(f"{spec.layers}.{i}.{rel}", rel) for i in range(n_blocks)]
        out = [name_matches(cfg.targets, *n) and not name_matches(cfg.ignore, *n) for n in names]
        if not any(out):
            raise ValueError(f"{flag} is set but no block's {what} matches targets={cfg.targets} minus "
                             f"ignore={cfg.ignore}; names look like {spec.layers}.0.{rel} (or {rel}): fix "
                             f"--targets / --ignore, or set {flag}=0.")
        return out
    return (chosen(spec.o, cfg.heads_ratio, "attention output projection", "heads_ratio"),
            chosen(spec.down, cfg.mlp_ratio, "MLP down projection", "mlp_ratio"))


def _counts(cfg: StructuredConfig, spec, shapes, head_units_scores=None, neuron_scores=None):
    """Per-block ``(head units, neurons)`` to remove: the uniform counts in every selected block, or
    (``uniform=False``) one global ranking over the selected blocks' unit scores; 0 elsewhere."""
    heads_on, mlp_on = selected_blocks(cfg, spec, len(shapes))
    head_remove = [0] * len(shapes)
    mlp_remove = [0] * len(shapes)
    if cfg.uniform:
        for i, (h, kv, _, m) in enumerate(shapes):
            if heads_on[i]:
                head_remove[i] = cfg.head_removal(h, kv, strict=True)
            if mlp_on[i] and m is not None:
                mlp_remove[i] = removal_count(m, cfg.mlp_ratio, strict=False, what=f"mlp_ratio (block with {m} neurons)")
        return head_remove, mlp_remove
    for on, scores, out, ratio, what in ((heads_on, head_units_scores, head_remove, cfg.heads_ratio, "heads_ratio"),
                                         (mlp_on, neuron_scores, mlp_remove, cfg.mlp_ratio, "mlp_ratio")):
        picked = [i for i in range(len(shapes)) if on[i]]
        if picked:
            for i, n in zip(picked, global_removal_counts([scores[i] for i in picked], ratio, what)):
                out[i] = n
    return head_remove, mlp_remove


def _plan(model, cfg: StructuredConfig, spec, blocks, shapes, block_stats):
    """Importance scores and per-block removal counts (uniform, or from the global ranking)."""
    do_heads, do_mlp = cfg.heads_ratio > 0, cfg.mlp_ratio > 0
    # ---- importance -------------------------------------------------------------------------
    head_scores: list[torch.Tensor] = []
    kv_scores: list[torch.Tensor | None] = []
    neuron_scores: list[torch.Tensor] = []
    for i, (block, (n_heads, n_kv, hd, inter)) in enumerate(zip(blocks, shapes)):
        if do_heads:
            o_w = weight_matrix(get_submodule(block, spec.o))
            if cfg.importance == "magnitude":
                head_scores.append(magnitude_head_scores(q_weight(block, spec, n_heads, n_kv, hd), o_w, n_heads, hd))
                kv_scores.append(kv_sq_norms(block, spec, n_heads, n_kv, hd))
            else:
                ch = channel_scores(o_w, block_stats[i]["o"], cfg.importance)
                head_scores.append(heads_from_channels(ch, n_heads, hd))
                kv_scores.append(None)
        if do_mlp:
            down_w = weight_matrix(get_submodule(block, spec.down))
            if cfg.importance == "magnitude":
                neuron_scores.append(magnitude_neuron_scores(mlp_in_weights(block, spec, inter), [down_w]))
            else:
                neuron_scores.append(channel_scores(down_w, block_stats[i]["down"], cfg.importance))

    # ---- counts -----------------------------------------------------------------------------
    units = sorted_neurons = None
    if not cfg.uniform:
        if do_heads:
            for h, kv, _, _ in shapes:
                cfg.check_grouping(h, kv)
            units = [unit_scores(s, kv, cfg.gqa_mode, kvs) for s, kvs, (_, kv, _, _) in zip(head_scores, kv_scores, shapes)]
        if do_mlp:
            sorted_neurons = [s.sort(stable=True).values for s in neuron_scores]
    head_remove, mlp_remove = _counts(cfg, spec, shapes, units, sorted_neurons)
    return head_scores, kv_scores, neuron_scores, head_remove, mlp_remove


def removal_counts(model: nn.Module, cfg: StructuredConfig,
                   stats: Mapping[int, Mapping[str, ChannelStats]] | None = None) -> tuple[list[int], list[int]]:
    """Per-block ``(head units, neurons)`` to remove under ``cfg``: the uniform counts, or (``uniform=False``)
    the counts of the global ranking of ``cfg.importance`` scores on ``stats`` of the dense model
    (``importance='obs'`` ranks by Wanda scores here: the OBS errors of later blocks depend on the
    pruning of earlier ones)."""
    import dataclasses

    spec = get_spec(model)
    blocks = list(get_blocks(model, spec))
    shapes = [block_shapes(b, spec, model.config) for b in blocks]
    check_prunable(model, spec, cfg, shapes)
    if cfg.importance == "obs":
        cfg = dataclasses.replace(cfg, importance="wanda", compensation="lstsq")
    block_stats: list[dict[str, ChannelStats]] = [{} for _ in blocks]
    if cfg.importance != "magnitude" and not cfg.uniform:
        for i, (n_heads, _, hd, inter) in enumerate(shapes):
            if cfg.heads_ratio > 0:
                block_stats[i]["o"] = _check_stats(stats, len(blocks), "o", i, n_heads * hd, "uniform=False")
            if cfg.mlp_ratio > 0:
                block_stats[i]["down"] = _check_stats(stats, len(blocks), "down", i, inter, "uniform=False")
    if cfg.uniform:
        return _counts(cfg, spec, shapes)
    *_, heads, mlp = _plan(model, cfg, spec, blocks, shapes, block_stats)
    return heads, mlp


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
    targets: list[str] | str = ".*",
    ignore: list[str] | str = (),
) -> dict:
    """Remove attention heads and MLP neurons from ``model`` in place, from statistics of one
    dense pass and without least-squares compensation (``hfprune.prune`` with a
    :class:`StructuredConfig` runs the compensated, block-by-block version).

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
        targets, ignore: regexes over each block's o_proj / down_proj names choosing the blocks that
            lose heads / neurons (:func:`selected_blocks`); by default every block.

    Returns:
        A report: ``params_before``, ``params_after``, ``reload_with`` (``"transformers"`` or
        ``"hfprune"``) and ``blocks`` (per block: heads/kv heads/neurons before and after, kept
        query and KV head indices, number of neurons removed).
    """
    if importance == "obs":
        raise ValueError("importance='obs' runs block by block on the calibration data with least-squares "
                         "compensation: use hfprune.prune(model, tokenizer, StructuredConfig(...), calibration) "
                         "instead of prune_structured, or importance='wanda' / 'fluctuation' here.")
    cfg = StructuredConfig(heads_ratio=heads_ratio, mlp_ratio=mlp_ratio, importance=importance, uniform=uniform,
                           gqa_mode=gqa_mode, bias_compensation=bias_compensation, compensation="none",
                           targets=targets, ignore=ignore)
    spec = get_spec(model)
    blocks = list(get_blocks(model, spec))
    n_blocks = len(blocks)
    shapes = [block_shapes(b, spec, model.config) for b in blocks]
    do_heads = cfg.heads_ratio > 0
    do_mlp = cfg.mlp_ratio > 0
    check_prunable(model, spec, cfg, shapes)
    needs_stats = cfg.importance != "magnitude" or cfg.bias_compensation
    why = f"importance={cfg.importance!r}" if cfg.importance != "magnitude" else "bias_compensation=True"
    block_stats: list[dict[str, ChannelStats]] = [{} for _ in blocks]
    if needs_stats:
        for i, (n_heads, _, hd, inter) in enumerate(shapes):
            if do_heads:
                block_stats[i]["o"] = _check_stats(stats, n_blocks, "o", i, n_heads * hd, why)
            if do_mlp:
                block_stats[i]["down"] = _check_stats(stats, n_blocks, "down", i, inter, why)

    params_before = count_params(model)
    head_scores, kv_scores, neuron_scores, head_remove, mlp_remove = _plan(model, cfg, spec, blocks, shapes,
                                                                           block_stats)

    # ---- bias compensation prerequisites ----------------------------------------------------
    comp_attn = cfg.bias_compensation and do_heads and ensure_output_bias(model, spec, blocks, "attention")
    comp_mlp = cfg.bias_compensation and do_mlp and ensure_output_bias(model, spec, blocks, "mlp")

    # ---- surgery ----------------------------------------------------------------------------
    report_blocks = []
    for i, (block, shape) in enumerate(zip(blocks, shapes)):
        n_heads, n_kv, hd, inter = shape
        entry = {"index": i, "heads_before": n_heads, "kv_heads_before": n_kv, "neurons_before": inter}
        keep_heads, keep_kv, keep = torch.arange(n_heads), torch.arange(n_kv), None
        if do_heads and head_remove[i] > 0:
            keep_heads, keep_kv = select_heads(head_scores[i], n_kv, head_remove[i], cfg.gqa_mode, kv_scores[i])
            keep_heads, keep_kv = keep_heads.cpu(), keep_kv.cpu()
            if comp_attn:
                removed = head_rows(complement(keep_heads, n_heads), hd)
                add_bias_delta(get_submodule(block, spec.o), removed, block_stats[i]["o"])
            shrink_block(block, spec, shape, keep_heads, keep_kv)
        if do_mlp and mlp_remove[i] > 0:
            keep = select_neurons(neuron_scores[i], mlp_remove[i]).cpu()
            if comp_mlp:
                add_bias_delta(get_submodule(block, spec.down), complement(keep, inter), block_stats[i]["down"])
            shrink_block(block, spec, shape, keep_neurons=keep)
        report_blocks.append(block_report(entry, shape, keep_heads, keep_kv, keep))

    if do_heads or do_mlp:
        reload_with = write_config(model, spec, blocks)
    else:
        reload_with = "hfprune" if hasattr(model.config, PRUNED_SHAPES_KEY) else "transformers"
    if reload_with == "hfprune":
        logger.info("Per-block shapes stored in config.%s; reload with "
                    "hfprune.structured.AutoPrunedModelForCausalLM.from_pretrained.", PRUNED_SHAPES_KEY)
    params_after = count_params(model)
    logger.info("Structured pruning: %d -> %d parameters (%.1f%% removed).", params_before, params_after,
                100.0 * (params_before - params_after) / max(params_before, 1))
    return {
        "importance": cfg.importance,
        "uniform": cfg.uniform,
        "gqa_mode": cfg.gqa_mode,
        "heads_ratio": cfg.heads_ratio,
        "mlp_ratio": cfg.mlp_ratio,
        "compensation": "none",
        "bias_compensation": {"attention": bool(comp_attn), "mlp": bool(comp_mlp)},
        "params_before": params_before,
        "params_after": params_after,
        "reload_with": reload_with,
        "blocks": report_blocks,
    }


@register_pruner("structured", config_cls=StructuredConfig)
class StructuredPruner(ModelPruner):
    """Attention heads and MLP neurons removed (importance obs, magnitude, wanda or fluctuation; --target heads,mlp)."""

    @property
    def needs_data(self) -> bool:
        cfg = self.config
        return cfg.importance != "magnitude" or cfg.bias_compensation or cfg.sequential

    @property
    def report_name(self) -> str:
        return f"structured-{self.config.importance}"

    @property
    def refits_weights(self) -> bool:
        return self.config.sequential

    def input_widths(self, model: nn.Module) -> dict[str, int]:
        cfg = self.config
        if not cfg.uniform:
            raise ValueError("With uniform=False (--non-uniform) the widths each block keeps are chosen from the "
                             "calibration data, so a later stage cannot be checked against them: use uniform counts.")
        spec = get_spec(model)
        head_remove, mlp_remove = removal_counts(model, cfg)
        out = {}
        for i, block in enumerate(get_blocks(model, spec)):
            n_heads, n_kv, hd, inter = block_shapes(block, spec, model.config)
            if cfg.heads_ratio > 0 and head_remove[i]:
                kind, _ = head_units(n_heads, n_kv, cfg.gqa_mode)
                heads = head_remove[i] * (n_kv if kind == "slice" else n_heads // n_kv)
                out[f"{spec.layers}.{i}.{spec.o}"] = (n_heads - heads) * hd
            if cfg.mlp_ratio > 0 and mlp_remove[i]:
                out[f"{spec.layers}.{i}.{spec.down}"] = inter - mlp_remove[i]
        return out

    def check(self, model: nn.Module) -> None:
        cfg = self.config
        spec = get_spec(model)
        if spec.discovered:
            from hfprune.arch.discovery import check_structured

            check_structured(model, spec, heads=cfg.heads_ratio > 0, mlp=cfg.mlp_ratio > 0)
        selected_blocks(cfg, spec, len(get_blocks(model, spec)))  # targets / ignore select something
        if is_offloaded(model):
            raise ValueError("Structured pruning changes layer shapes and needs the model in memory: load it without "
                             "offloading (no device_map offload / --low-memory).")
        if cfg.sequential:
            blocks = list(get_blocks(model, spec))
            check_prunable(model, spec, cfg, [block_shapes(b, spec, model.config) for b in blocks])
            if cfg.heads_ratio > 0 and cfg.uniform:
                for b in blocks:  # ratio / GQA grouping problems surface now, before calibration
                    n_heads, n_kv, _, _ = block_shapes(b, spec, model.config)
                    cfg.head_removal(n_heads, n_kv, strict=True)

    def prune_model(self, model, ids, calib, *, progress=True):
        """With compensation, block by block (:mod:`hfprune.structured.sequential`); otherwise channel
        statistics from one dense calibration pass (when the importance or bias compensation needs
        data), then :func:`prune_structured`."""
        cfg = self.config
        if cfg.sequential:
            result = self._sequential(model, ids, calib, progress)
        else:
            stats = None
            if ids is not None:
                runner = LayerRunner(model, get_spec(model),
                                     batch_size=calibration_batch_size(calib, ids, model, one_pass=False))
                stats = runner.collect(ids, attach_channel_stats, desc="hfprune structured stats", progress=progress)
            result = prune_structured(model, heads_ratio=cfg.heads_ratio, mlp_ratio=cfg.mlp_ratio,
                                      importance=cfg.importance, stats=stats, uniform=cfg.uniform,
                                      gqa_mode=cfg.gqa_mode, bias_compensation=cfg.bias_compensation,
                                      targets=cfg.targets, ignore=cfg.ignore)
        blocks = [{"index": i, **{k: v for k, v in b.items() if not isinstance(v, list)}}
                  for i, b in enumerate(result["blocks"])]
        return {"structured": result, "blocks": blocks}

    def _sequential(self, model, ids, calib, progress) -> dict:
        """Block by block with least-squares compensation; with ``uniform=False`` the per-block counts
        come from one dense statistics pass first."""
        from hfprune.structured.sequential import prune_sequential

        cfg = self.config
        spec = get_spec(model)
        blocks = list(get_blocks(model, spec))
        params_before = count_params(model)
        runner = LayerRunner(model, spec, batch_size=calibration_batch_size(calib, ids, model, one_pass=False))
        stats = None
        if not cfg.uniform and cfg.importance != "magnitude":
            stats = runner.collect(ids, attach_channel_stats, desc="hfprune structured allocation",
                                   progress=progress, release=False)
        head_remove, mlp_remove = removal_counts(model, cfg, stats)
        del stats
        comp_attn = cfg.bias_compensation and cfg.heads_ratio > 0 and \
            ensure_output_bias(model, spec, blocks, "attention")
        comp_mlp = cfg.bias_compensation and cfg.mlp_ratio > 0 and ensure_output_bias(model, spec, blocks, "mlp")
        runner.capture(ids)
        if cfg.dense_targets == "model":
            runner.start_dense_stream()
        entries = prune_sequential(runner, spec, cfg, head_remove, mlp_remove, progress=progress)
        runner.release()
        reload_with = write_config(model, spec, blocks)
        if reload_with == "hfprune":
            logger.info("Per-block shapes stored in config.%s; reload with "
                        "hfprune.structured.AutoPrunedModelForCausalLM.from_pretrained.", PRUNED_SHAPES_KEY)
        return {"importance": cfg.importance, "uniform": cfg.uniform, "gqa_mode": cfg.gqa_mode,
                "heads_ratio": cfg.heads_ratio, "mlp_ratio": cfg.mlp_ratio, "compensation": cfg.resolved_compensation,
                "bias_compensation": {"attention": bool(comp_attn), "mlp": bool(comp_mlp)},
                "params_before": params_before, "params_after": count_params(model), "reload_with": reload_with,
                "blocks": entries}
