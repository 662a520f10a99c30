"""Depth and hidden-size pruning as registered methods (``hfprune prune --method depth|hidden``).

The work happens in :mod:`hfprune.structured.depth` and :mod:`hfprune.structured.hidden`;
:func:`hfprune.prune` runs their own flows for these configs (whole blocks or residual channels go,
so there is no per-layer loop)."""

from __future__ import annotations

from hfprune.methods.base import Pruner
from hfprune.registry import register_pruner
from hfprune.structured.depth import DepthPruningConfig
from hfprune.structured.hidden import HiddenPruningConfig

__all__ = ["DepthPruner", "HiddenPruner"]


@register_pruner("depth", config_cls=DepthPruningConfig)
class DepthPruner(Pruner):
    """Removes whole decoder blocks (:func:`hfprune.structured.depth.run_depth_pruning`)."""

    structured = True
    requires_calibration = True


@register_pruner("hidden", config_cls=HiddenPruningConfig)
class HiddenPruner(Pruner):
    """Removes residual-stream channels (:func:`hfprune.structured.hidden.run_hidden_pruning`)."""

    structured = True
    requires_calibration = True
