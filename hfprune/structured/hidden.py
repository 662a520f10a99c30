"""Hidden-size pruning: remove residual-stream (embedding) channels, as Minitron does.

Importance of channel ``i`` (Minitron, Muralidharan et al. 2024, "Compact Language Models via
Pruning and Knowledge Distillation", section 2.2): the activations of the normalisation layers,
which are all in the residual basis,

    F_i = sum_norms  sqrt( mean_t  LN(X)_t,i ^2 )            (``importance="activation"``)

over the calibration tokens (L2 over tokens, summed over every norm of the model), or, data-free,
the summed relative squared norms of channel ``i``'s slices of every residual weight
(``importance="magnitude"``). The ``hidden_size`` highest-scoring channels are kept, the same set
everywhere, so the residual stream stays one basis. Every norm then divides by an RMS over fewer
channels; with calibration data its weight is multiplied by the measured ratio
``r = sqrt(mean_kept E[x_i^2] / mean_all E[x_i^2])`` of its input (``norm_correction``), which is
exact when the removed channels are silent.

Which tensors hold hidden channels is not listed by hand: the model class is built (empty) from
the config with the new ``hidden_size`` and every parameter dimension that changes is a residual
dimension: embeddings (input and tied or untied output), every norm weight and bias, every
projection that reads the residual stream (q/k/v, gate/up, routers, fused experts'
``gate_up_proj``: input columns) or writes it (o_proj, down_proj, experts' ``down_proj``: output
rows), position embeddings. ``head_dim`` is written to the config explicitly (it stops being
``hidden_size // num_heads``), so the attention and MLP widths are untouched; families that derive
``head_dim`` from the hidden size and have no ``head_dim`` field (GPT-2, OPT, GPT-NeoX) are refused.
Gemma's ``sqrt(hidden_size)`` embedding scale is compensated (:mod:`hfprune.arch.resize`).
Stock ``AutoModelForCausalLM.from_pretrained`` reloads the result.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from hfprune.config import KeepOrRatioConfig, renamed

logger = logging.getLogger(__name__)

__all__ = ["HiddenPruningConfig", "CHANNEL_IMPORTANCES", "hidden_plan", "channel_importance", "norm_corrections",
           "prune_hidden"]

CHANNEL_IMPORTANCES = ("activation", "magnitude")


@dataclass
class HiddenPruningConfig(KeepOrRatioConfig):
    """Remove residual-stream channels (``hidden_size``).

    Example:
        >>> from hfprune import HiddenPruningConfig
        >>> HiddenPruningConfig.from_dict({"method": "hidden", "hidden_ratio": 0.25}).importance
        'activation'
    """

    method: ClassVar[str] = "hidden"
    amount: ClassVar[tuple[str, str, str]] = ("keep_hidden", "hidden_ratio", "residual channels")
    importances: ClassVar[tuple[str, ...]] = CHANNEL_IMPORTANCES

    hidden_ratio: float | None = field(default=None, metadata={
        "help": "Hidden: fraction of the residual (embedding) channels to remove."})
    keep_hidden: int | None = field(default=None, metadata={
        "help": "Hidden: residual channels to keep (the new hidden_size; if --hidden-ratio is unset)."})
    importance: str = field(default="activation", metadata={
        "help": "Hidden: activation (Minitron: norm outputs on calibration data) or magnitude (data-free).",
        "choices": CHANNEL_IMPORTANCES})
    multiple_of: int = field(default=1, metadata={
        "help": "Hidden: round the kept channels down to a multiple of this (e.g. 8 or 64 for fast kernels)."})
    norm_correction: bool = field(default=True, metadata={
        "help": "Hidden, activation importance: rescale every norm weight by the measured ratio of the kept "
                "channels' RMS to all channels' RMS of its input (the norm divides by an RMS over fewer channels)."})

    channel_importance: str | None = renamed("importance")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.multiple_of < 1:
            raise ValueError(f"multiple_of must be at least 1, got {self.multiple_of}.")

    @property
    def needs_data(self) -> bool:
        return self.importance == "activation"


# --------------------------------------------------------------------------------------------
# Plan: the new config and which tensors hold hidden channels
# --------------------------------------------------------------------------------------------


@dataclass
class HiddenPlan:
    hidden: int
    keep_count: int
    config: Any
    """The rewritten config (``hidden_size`` and an explicit ``head_dim``)."""
    dims: dict[str, tuple[int, ...]]
    """Parameter / persistent buffer name -> the dimensions that hold hidden channels."""
    empty: nn.Module
    """The model class built from ``config`` (meta parameters, real buffers)."""


def _config_with(config, spec, hidden: int):
    from hfprune.arch import head_dim_of

    new = copy.deepcopy(config)
    if spec.o is not None:
        head_dim = head_dim_of(config, spec)
        setattr(new, spec.head_dim_attr, head_dim)
    setattr(new, spec.hidden_attr, hidden)
    return new


def hidden_plan(model: nn.Module, config: HiddenPruningConfig) -> HiddenPlan:
    """The kept width (rounded to ``multiple_of`` and to what the config class accepts) and the
    residual dimensions of every tensor; raises before any work when the family cannot do it."""
    from hfprune.arch import get_spec
    from hfprune.structured.checkpoint import PRUNED_SHAPES_KEY, _config_rejects
    from hfprune.structured.stock import build_empty, stock_mismatch

    spec = get_spec(model)
    if spec.stacks:
        raise ValueError("Hidden-size pruning supports decoder-only models (one block stack).")
    if getattr(model.config, PRUNED_SHAPES_KEY, None):
        raise ValueError("This model has per-block shapes (config.pruned_shapes, from non-uniform width pruning); "
                         "hidden-size pruning needs a model its config describes: use uniform width pruning first.")
    if spec.o is not None and spec.head_dim_attr is None:
        raise ValueError(f"{model.config.model_type!r} derives head_dim from hidden_size // num_heads and its config "
                         f"has no head_dim field, so a smaller hidden size cannot be reloaded with the same heads; "
                         f"hidden-size pruning supports families with a head_dim field (Llama, Qwen, Mistral, Gemma...).")
    hidden = int(getattr(model.config, spec.hidden_attr))
    problems = stock_mismatch(model)
    if problems:
        raise ValueError(f"The model does not match what its config builds ({'; '.join(problems)}); hidden-size "
                         f"pruning needs a model that stock from_pretrained would rebuild.")
    want = config.keep_hidden if config.keep_hidden is not None else hidden - int(round(config.hidden_ratio * hidden))
    if not 1 <= want < hidden:
        raise ValueError(f"Keeping {want} of {hidden} hidden channels is not a reduction: keep between 1 and "
                         f"{hidden - 1}.")
    k, first_problem = want - want % config.multiple_of, None
    while k >= 1:
        problem = _config_rejects(model.config, {spec.hidden_attr: k, **(
            {spec.head_dim_attr: getattr(_config_with(model.config, spec, k), spec.head_dim_attr)}
            if spec.o is not None else {})})
        if problem is None:
            break
        first_problem = first_problem or problem
        k -= config.multiple_of
    if k < 1:
        raise ValueError(f"No hidden size <= {want} is accepted by {type(model.config).__name__} ({first_problem}).")
    if k != want:
        logger.info("Hidden size %d rounded to %d (%s).", want, k,
                    first_problem or f"a multiple of {config.multiple_of}")
    new_config = _config_with(model.config, spec, k)
    empty = build_empty(model, new_config)
    dims: dict[str, tuple[int, ...]] = {}
    theirs = {**dict(empty.named_parameters(remove_duplicate=False)), **dict(empty.named_buffers())}
    mine = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    for name, t in mine.items():
        other = theirs.get(name)
        if other is None or other.dim() != t.dim():
            continue
        changed = tuple(d for d in range(t.dim()) if t.shape[d] != other.shape[d])
        for d in changed:
            if (t.shape[d], other.shape[d]) != (hidden, k):
                raise ValueError(f"{name} changes from {tuple(t.shape)} to {tuple(other.shape)} with hidden_size "
                                 f"{hidden} -> {k}: dimension {d} is not a residual dimension; please report the "
                                 f"model type.")
        if changed:
            dims[name] = changed
    return HiddenPlan(hidden=hidden, keep_count=k, config=new_config, dims=dims, empty=empty)


# --------------------------------------------------------------------------------------------
# Importance
# --------------------------------------------------------------------------------------------


def _norm_modules(model: nn.Module, plan: HiddenPlan) -> dict[str, nn.Module]:
    """Modules whose own 1-D ``weight`` holds hidden channels (the norms), by name."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        w = module._parameters.get("weight")
        key = f"{name}.weight" if name else "weight"
        if w is not None and w.dim() == 1 and key in plan.dims:
            out[name] = module
    return out


@torch.no_grad()
def channel_importance(model: nn.Module, plan: HiddenPlan, ids: torch.Tensor | None, importance: str, *,
                       batch_size: int = 4, progress: bool = False,
                       norm_inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Score of every hidden channel (``[hidden]``, float64; higher is kept). With
    ``importance="activation"``, ``norm_inputs`` (a dict) receives every norm's mean squared input
    per channel (``E_t[x_t,i^2]``, for :func:`norm_corrections`)."""
    from hfprune.arch import get_blocks
    from hfprune.core.runner import LayerRunner

    hidden = plan.hidden
    if importance == "magnitude":
        params = dict(model.named_parameters())
        score = torch.zeros(hidden, dtype=torch.float64)
        for name, dims in plan.dims.items():
            p = params.get(name)
            if p is None or p.dim() < 2:
                continue
            for d in dims:
                sq = p.detach().double().pow(2).transpose(0, d).reshape(hidden, -1).sum(1).cpu()
                score += sq / sq.mean().clamp_min(1e-30)
        return score
    if ids is None:
        raise ValueError("importance='activation' needs calibration data; or use 'magnitude'.")
    norms = _norm_modules(model, plan)
    if not norms:
        raise ValueError(f"{type(model).__name__} has no norm with a per-channel weight to measure; use "
                         f"importance='magnitude'.")
    sums = {name: torch.zeros(hidden, dtype=torch.float64) for name in norms}
    in_sums = {name: torch.zeros(hidden, dtype=torch.float64) for name in norms}
    counts = dict.fromkeys(norms, 0)

    def make_hook(name):
        def hook(_mod, inp, out):
            out = out[0] if isinstance(out, (tuple, list)) else out
            flat = out.detach().reshape(-1, out.shape[-1]).double()
            sums[name] += flat.pow(2).sum(0).cpu()
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            in_sums[name] += x.pow(2).sum(0).cpu()
            counts[name] += flat.shape[0]
        return hook

    blocks = get_blocks(model)
    inside = {id(m) for b in blocks for m in b.modules()}

    # Hooked before the capture, which runs block 0 once on the first batch to learn its output
    # structure: that batch is counted twice in block 0's norms (kept so that outputs stay as they were).
    handles = [m.register_forward_hook(make_hook(n)) for n, m in norms.items() if id(m) in inside]

    def attach(_model):
        return None, lambda: [h.remove() for h in handles]

    runner = LayerRunner(model, batch_size=batch_size)
    try:
        runner.collect(ids, attach, update_last=True, release=False, desc="hfprune hidden importance",
                       progress=progress)
        for name, module in norms.items():  # the final norm(s), outside the blocks, see the last block's output
            if id(module) not in inside:
                hook = make_hook(name)
                for h in runner.hidden:
                    hook(module, (h,), module(h.to(next(module.parameters()).device)))
    finally:
        for h in handles:
            h.remove()
        runner.release()
    score = torch.zeros(hidden, dtype=torch.float64)
    for name in norms:
        if counts[name]:
            score += (sums[name] / counts[name]).sqrt()
            if norm_inputs is not None:
                norm_inputs[name] = in_sums[name] / counts[name]
    return score


def norm_corrections(norm_inputs: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, float]:
    """Per norm, ``r = sqrt(mean_{i kept} E[x_i^2] / mean_i E[x_i^2])``: an RMS norm over the kept
    channels divides by about ``r`` times the RMS it divided by before, so its weight is multiplied
    by ``r`` to keep its outputs' scale."""
    out = {}
    for name, sq in norm_inputs.items():
        total = float(sq.mean())
        if total > 0:
            out[name] = math.sqrt(float(sq[keep.to(sq.device)].mean()) / total)
    return out


# --------------------------------------------------------------------------------------------
# Surgery
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def prune_hidden(model: nn.Module, plan: HiddenPlan, keep: torch.Tensor,
                 norm_scale: dict[str, float] | None = None) -> list[str]:
    """Keep the hidden channels ``keep`` (sorted) in every residual tensor of ``model`` in place and
    write the new config; returns ``"name: old -> new"`` of every tensor resized. ``norm_scale``
    multiplies norm modules' effective weights (``offset + weight``; :func:`norm_corrections`)."""
    from hfprune.arch import get_spec, get_submodule
    from hfprune.arch.resize import NORM_WEIGHT_OFFSET, SQRT_HIDDEN_EMBED_SCALE
    from hfprune.structured.stock import derived_buffers

    hidden, k = plan.hidden, plan.keep_count
    keep = keep.sort().values.cpu()
    if keep.numel() != k:
        raise ValueError(f"keep has {keep.numel()} channels but the plan keeps {k}.")
    model_type = model.config.model_type
    in_emb = model.get_input_embeddings()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = out_emb is not None and out_emb.weight is in_emb.weight
    embed_norm = SQRT_HIDDEN_EMBED_SCALE.get(model_type)
    if embed_norm is not None:
        # Embeddings are multiplied by sqrt(hidden_size): rescale the matrix so the inputs are unchanged,
        # and the final norm so that, with tied embeddings, the logits are unchanged too.
        c = math.sqrt(hidden / k)
        in_emb.weight.data.mul_(c)
        if tied:
            norm = get_submodule(model, embed_norm)
            offset = NORM_WEIGHT_OFFSET.get(model_type, 0.0)
            norm.weight.data.copy_(((offset + norm.weight.data.float()) / c - offset).to(norm.weight.dtype))

    offset = NORM_WEIGHT_OFFSET.get(model_type, 0.0)
    for name, r in (norm_scale or {}).items():
        w = get_submodule(model, name).weight
        w.data.copy_(((offset + w.data.double()) * r - offset).to(w.dtype))
    new_params: dict[int, nn.Parameter] = {}
    resized = []
    modules = dict(model.named_modules())
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        dims = plan.dims.get(name)
        if not dims:
            continue
        owner, _, attr = name.rpartition(".")
        module = modules[owner]
        if id(p) not in new_params:
            t = p.data
            for d in dims:
                t = t.index_select(d, keep.to(t.device))
            new_params[id(p)] = nn.Parameter(t.contiguous(), requires_grad=p.requires_grad)
            resized.append(f"{name}: {tuple(p.shape)} -> {tuple(t.shape)}")
        setattr(module, attr, new_params[id(p)])
    for name, b in list(model.named_buffers()):
        dims = plan.dims.get(name)
        if dims:
            owner, _, attr = name.rpartition(".")
            t = b
            for d in dims:
                t = t.index_select(d, keep.to(t.device))
            modules[owner]._buffers[attr] = t.contiguous()
            resized.append(f"{name}: {tuple(b.shape)} -> {tuple(t.shape)}")
    # Attributes the modules derive from the config (Linear.in_features, Embedding.embedding_dim,
    # LayerNorm.normalized_shape, Gemma's scalar embedding scale...). hidden_plan checked that the model
    # matched its config before, so every difference now comes from the new hidden size.
    empty_modules = dict(plan.empty.named_modules())
    for name, module in modules.items():
        other = empty_modules.get(name)
        if other is None:
            continue
        for attr, value in list(vars(module).items()):
            if attr.startswith("_") or attr in ("training", "config") or attr not in vars(other):
                continue
            new = vars(other)[attr]
            simple = isinstance(value, (int, float, str, bool, tuple)) and type(new) is type(value)
            if simple and new != value:
                setattr(module, attr, new)
    spec = get_spec(model)
    setattr(model.config, spec.hidden_attr, k)
    if spec.o is not None:
        setattr(model.config, spec.head_dim_attr, getattr(plan.config, spec.head_dim_attr))
    for name, value in derived_buffers(model).items():  # e.g. Gemma-3's embed_scale, now sqrt(k)
        owner, _, attr = name.rpartition(".")
        modules[owner]._buffers[attr] = value
        logger.info("Hidden pruning: buffer %s recomputed from the new config.", name)
    return resized
