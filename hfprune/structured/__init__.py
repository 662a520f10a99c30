"""Structured pruning parts: importance, selection, surgery and checkpoint (reload of pruned shapes).

The method itself (:class:`StructuredConfig`, :func:`prune_structured`) is registered with the
other methods in :mod:`hfprune.methods.structured`.
"""

from hfprune.stats import ChannelStats
from hfprune.structured.checkpoint import PRUNED_SHAPES_KEY, AutoPrunedModelForCausalLM, apply_pruned_shapes
from hfprune.structured.importance import (attach_channel_stats, channel_scores, heads_from_channels,
                                           magnitude_head_scores, magnitude_neuron_scores)
from hfprune.structured.selection import global_removal_counts, head_units, removal_count, select_heads, select_neurons
from hfprune.structured.surgery import LayerConfigView


def __getattr__(name):  # the method lives in hfprune.methods (importing it here would be a cycle)
    if name in ("StructuredConfig", "prune_structured", "IMPORTANCES", "GQA_MODES"):
        from hfprune.methods import structured

        return getattr(structured, name)
    raise AttributeError(f"module 'hfprune.structured' has no attribute {name!r}")
