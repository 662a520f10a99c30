"""Structured expert pruning: remove whole MoE experts by router-weighted importance (REAP).

Importance of expert ``j`` in one MoE layer (REAP, Lasby et al. 2025, "router-weighted expert
activation pruning"): the mean, over the calibration tokens the router sent to ``j``, of the router
weight times the norm of the expert's output,

    S_j = 1/|X_j| * sum_{x in X_j} g_j(x) * ||f_j(x)||_2 ,

measured on the dense model. ``importance="frequency"`` counts routed tokens instead. Every MoE
layer keeps its ``num_experts - remove`` most important experts (the same count everywhere, so the
config keeps one expert count): the fused expert tensors, the router rows (weight, bias, score
correction bias) and the expert-count fields of the config shrink, and stock ``from_pretrained``
reloads the smaller model. Shared experts are ordinary MLPs and are kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from hfprune.config import KeepOrRatioConfig, renamed

logger = logging.getLogger(__name__)

__all__ = ["ExpertPruningConfig", "prune_experts", "expert_importance", "experts_to_keep"]

EXPERT_IMPORTANCES = ("reap", "frequency")
_COUNT_FIELDS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")


@dataclass
class ExpertPruningConfig(KeepOrRatioConfig):
    """Remove whole experts from every MoE layer.

    Example:
        >>> from hfprune import ExpertPruningConfig
        >>> ExpertPruningConfig(keep_experts=6).importance
        'reap'
    """

    method: ClassVar[str] = "experts"
    amount: ClassVar[tuple[str, str, str]] = ("keep_experts", "experts_ratio", "experts")
    importances: ClassVar[tuple[str, ...]] = EXPERT_IMPORTANCES
    keep_experts: int | None = field(default=None, metadata={
        "help": "Experts: experts every MoE layer keeps (the new expert count; if --experts-ratio is unset)."})
    experts_ratio: float | None = field(default=None, metadata={
        "help": "Experts: fraction of the experts removed from every MoE layer (rounded)."})
    importance: str = field(default="reap", metadata={
        "help": "reap (mean router weight x expert output norm over routed tokens) or frequency (routed token "
                "count).", "choices": EXPERT_IMPORTANCES})
    num_experts: int | None = renamed("keep_experts")
    ratio: float | None = renamed("experts_ratio")


def _moe_modules(model: nn.Module, spec) -> list[tuple[int, str, nn.Module]]:
    from hfprune.arch import get_blocks
    from hfprune.arch import moe

    out = []
    for i, block in enumerate(get_blocks(model, spec)):
        for path in spec.experts:
            try:
                module = block.get_submodule(path)
            except AttributeError:
                continue
            if moe.is_fused_experts(module):
                if not moe._is_decorated(module):
                    raise ValueError(f"{type(module).__name__} is not a transformers experts module with a known layout; "
                                     f"expert pruning supports the fused experts of transformers' MoE integration.")
                out.append((i, path, module))
    if not out:
        raise ValueError(f"{type(model).__name__} has no fused MoE experts to prune.")
    return out


@torch.no_grad()
def expert_importance(model: nn.Module, ids: torch.Tensor, importance: str = "reap", batch_size: int = 4,
                      progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Per MoE layer (``"{block}.{path}"``): ``score`` and ``tokens`` of every expert, from the dense model."""
    from hfprune.arch import get_spec
    from hfprune.arch import moe
    from hfprune.core.runner import LayerRunner

    spec = get_spec(model)
    mods = _moe_modules(model, spec)
    stats: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for i, path, module in mods:
        n = moe._num_experts(module)
        key = f"{spec.layers}.{i}.{path}"
        stats[key] = {"score": torch.zeros(n, dtype=torch.float64), "tokens": torch.zeros(n, dtype=torch.long)}

        def hook(mod, args, _out, key=key):
            hidden, top_k_index, top_k_weights = args[:3]
            for e in range(stats[key]["score"].numel()):
                token_idx, k_pos = torch.where(top_k_index == e)
                stats[key]["tokens"][e] += token_idx.numel()
                if token_idx.numel() and importance == "reap":
                    y = moe.expert_output(mod, e, hidden[token_idx])
                    g = top_k_weights[token_idx, k_pos].float()
                    stats[key]["score"][e] += float((g * y.float().norm(dim=-1)).sum())

        handles.append(module.register_forward_hook(hook))
    try:
        LayerRunner(model, spec, batch_size=batch_size).collect(ids, desc="hfprune expert importance", progress=progress)
    finally:
        for h in handles:
            h.remove()
    for s in stats.values():
        if importance == "reap":
            s["score"] = s["score"] / s["tokens"].clamp_min(1)
        else:
            s["score"] = s["tokens"].double()
    return stats


def _shrink_first_dim(module: nn.Module, n: int, keep: torch.Tensor, skip: tuple[nn.Module, ...] = ()) -> None:
    """Index every parameter and buffer of ``module`` (recursively, except ``skip``) whose first
    dimension is ``n`` by ``keep``, and set ``num_experts``-like attributes to the new count."""
    skipped = {id(m) for s in skip for m in s.modules()}
    for sub in module.modules():
        if id(sub) in skipped:
            continue
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.dim() >= 1 and p.shape[0] == n:
                setattr(sub, name, nn.Parameter(p.data[keep].clone(), requires_grad=p.requires_grad))
        for name, b in list(sub.named_buffers(recurse=False)):
            if b is not None and b.dim() >= 1 and b.shape[0] == n:
                sub._buffers[name] = b[keep].clone()
        for attr in _COUNT_FIELDS:
            if getattr(sub, attr, None) == n:
                setattr(sub, attr, int(keep.numel()))


def experts_to_keep(model: nn.Module, config: ExpertPruningConfig) -> int:
    """Experts every MoE layer keeps under ``config`` (raises when that is not possible)."""
    from hfprune.arch import get_spec
    from hfprune.arch.discovery import text_config

    n = moe_num(_moe_modules(model, get_spec(model)))
    keep_n = config.keep_experts if config.keep_experts is not None else n - int(round(config.experts_ratio * n))
    cfg = text_config(model)
    top_k = getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "num_experts_per_token", None) or 1
    if not top_k <= keep_n < n:
        raise ValueError(f"Keeping {keep_n} of {n} experts is not possible: keep at least num_experts_per_tok="
                         f"{top_k} and fewer than {n}.")
    return keep_n


@torch.no_grad()
def prune_experts(model: nn.Module, config: ExpertPruningConfig, ids: torch.Tensor | None, *,
                  progress: bool = False) -> dict[str, Any]:
    """Remove experts in place (see the module docstring); returns what was kept per layer."""
    from hfprune.arch import get_spec
    from hfprune.arch.discovery import text_config

    spec = get_spec(model)
    mods = _moe_modules(model, spec)
    n = moe_count = moe_num(mods)
    keep_n = experts_to_keep(model, config)
    cfg = text_config(model)
    if ids is None:
        raise ValueError("Expert pruning needs calibration data (router weights and expert outputs).")
    scores = expert_importance(model, ids, config.importance, progress=progress)
    layers = {}
    for (i, path, module), (key, s) in zip(mods, scores.items()):
        order = torch.argsort(s["score"], descending=True, stable=True)
        keep = torch.sort(order[:keep_n]).values
        parent_path = path.rsplit(".", 1)[0] if "." in path else ""
        block = model.get_submodule(spec.layers)[i]
        parent = block.get_submodule(parent_path) if parent_path else block
        shared = tuple(m for name, m in parent.named_children() if "shared" in name)
        _shrink_first_dim(parent, moe_count, keep, skip=shared)
        layers[key] = {"kept": keep.tolist(), "score": [round(float(v), 6) for v in s["score"]],
                       "tokens": s["tokens"].tolist()}
    for owner in {id(c): c for c in (model.config, cfg)}.values():
        for attr in _COUNT_FIELDS:
            if getattr(owner, attr, None) == moe_count:
                setattr(owner, attr, keep_n)
    logger.info("Expert pruning kept %d of %d experts in %d MoE layers.", keep_n, n, len(layers))
    return {"experts_before": n, "experts_after": keep_n, "layers": layers}


def moe_num(mods) -> int:
    from hfprune.arch import moe

    counts = {moe._num_experts(m) for _, _, m in mods}
    if len(counts) != 1:
        raise ValueError(f"MoE layers with different expert counts {sorted(counts)} are not supported.")
    return counts.pop()
