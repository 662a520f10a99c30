"""The model-level methods that resize the model as a whole: whole decoder blocks (``depth``),
residual channels (``hidden``) and MoE experts (``experts``).

Each pruner plans on the dense model's calibration statistics and applies the plan; the
measurement and surgery are in :mod:`hfprune.structured.depth`, :mod:`~hfprune.structured.hidden`
and :mod:`~hfprune.structured.experts`."""

from __future__ import annotations

import logging

import torch

from hfprune.arch import find_linears, get_blocks, get_spec, in_features
from hfprune.core.runner import is_offloaded
from hfprune.methods.base import ModelPruner
from hfprune.registry import register_pruner
from hfprune.report import DepthRemoval, HiddenRemoval
from hfprune.structured.depth import DepthPruningConfig, depth_scores, remove_blocks
from hfprune.structured.experts import ExpertPruningConfig, experts_to_keep, prune_experts
from hfprune.structured.hidden import (HiddenPruningConfig, channel_importance, hidden_plan, norm_corrections,
                                       prune_hidden)
from hfprune.structured.stock import check_stock_reload

logger = logging.getLogger(__name__)

__all__ = ["DepthPruner", "HiddenPruner", "ExpertPruner"]


def _token_windows(ids, what: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{what} calibrates on token windows; pass text or a [n, seqlen] token tensor.")
    return ids


@register_pruner("depth", config_cls=DepthPruningConfig)
class DepthPruner(ModelPruner):
    """Whole decoder blocks removed (importance block_influence, angular or perplexity; stock reload)."""

    def check(self, model):
        if is_offloaded(model):
            raise ValueError("Depth pruning changes the model's structure and needs it in memory (no offloading).")
        if get_spec(model).stacks:
            raise ValueError("Depth pruning supports decoder-only models (one block stack).")
        self.config.blocks_to_remove(len(get_blocks(model)))  # bad counts fail before calibration

    def prune_model(self, model, ids, calib, *, progress=True):
        config = self.config
        n_before = len(get_blocks(model))
        ids = _token_windows(ids, "Depth pruning")
        measured = depth_scores(model, ids, config, seed=calib.seed, batch_size=calib.batch_size or 4,
                                progress=progress)
        changes = remove_blocks(model, measured["removed"])
        check_stock_reload(model, "Depth pruning")
        record = DepthRemoval(criterion=config.importance, blocks_before=n_before,
                              blocks_after=n_before - len(measured["removed"]), removed=measured["removed"],
                              scores=[round(float(s), 6) for s in measured["scores"]], config_changes=changes,
                              block_influence=[round(v, 6) for v in measured.get("block_influence", [])] or None,
                              angular_distance=[round(v, 6) for v in measured.get("angular_distance", [])] or None)
        logger.info("Depth pruning (%s) removed blocks %s: %d -> %d blocks.", config.importance, record.removed,
                    n_before, record.blocks_after)
        return {"depth": record, "structured": {"reload_with": "transformers"}}


@register_pruner("hidden", config_cls=HiddenPruningConfig)
class HiddenPruner(ModelPruner):
    """Residual-stream channels removed, the new hidden_size (importance activation or magnitude; stock reload)."""

    @property
    def needs_data(self) -> bool:
        return self.config.needs_data

    def check(self, model):
        if is_offloaded(model):
            raise ValueError("Hidden-size pruning changes every tensor's shape and needs the model in memory.")
        hidden_plan(model, self.config)  # every refusal before calibration

    def input_widths(self, model):
        plan = hidden_plan(model, self.config)
        spec = get_spec(model)
        return {f"{spec.layers}.{i}.{rel}": plan.keep_count for i, block in enumerate(get_blocks(model, spec))
                for rel, m in find_linears(block).items() if in_features(m) == plan.hidden}

    def prune_model(self, model, ids, calib, *, progress=True):
        config = self.config
        plan = hidden_plan(model, config)
        if ids is not None:
            ids = _token_windows(ids, "Hidden-size pruning")
        norm_inputs: dict[str, torch.Tensor] = {}
        scores = channel_importance(model, plan, ids, config.importance, batch_size=calib.batch_size or 4,
                                    progress=progress, norm_inputs=norm_inputs)
        keep = scores.argsort(descending=True, stable=True)[:plan.keep_count].sort().values
        norm_scale = norm_corrections(norm_inputs, keep) if config.norm_correction and norm_inputs else None
        removed = sorted(set(range(plan.hidden)) - set(keep.tolist()))
        spec = get_spec(model)
        head_dim_before = getattr(model.config, spec.head_dim_attr, None) if spec.head_dim_attr else None
        resized = prune_hidden(model, plan, keep, norm_scale)
        check_stock_reload(model, "Hidden-size pruning")
        changes = {spec.hidden_attr: {"before": plan.hidden, "after": plan.keep_count}}
        if spec.o is not None and head_dim_before != getattr(model.config, spec.head_dim_attr):
            changes[spec.head_dim_attr] = {"before": head_dim_before,
                                           "after": getattr(model.config, spec.head_dim_attr)}
        record = HiddenRemoval(hidden_before=plan.hidden, hidden_after=plan.keep_count, removed_channels=removed,
                               resized=resized, config_changes=changes,
                               norm_scale={k: round(v, 6) for k, v in (norm_scale or {}).items()} or None)
        logger.info("Hidden-size pruning: hidden %d -> %d.", plan.hidden, plan.keep_count)
        return {"hidden": record, "structured": {"reload_with": "transformers"}}


@register_pruner("experts", config_cls=ExpertPruningConfig)
class ExpertPruner(ModelPruner):
    """Whole MoE experts removed in every MoE layer (importance reap or frequency; stock reload)."""

    @property
    def report_name(self) -> str:
        return f"experts-{self.config.importance}"

    def check(self, model):
        if is_offloaded(model):
            raise ValueError("Expert pruning changes tensor shapes and needs the model in memory (no offloading).")
        experts_to_keep(model, self.config)

    def prune_model(self, model, ids, calib, *, progress=True):
        result = prune_experts(model, self.config, _token_windows(ids, "Expert pruning"), progress=progress)
        result.update(reload_with="AutoModelForCausalLM",
                      experts_kept={k: v["kept"] for k, v in result["layers"].items()})
        return {"structured": result}
