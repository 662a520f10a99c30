"""Architecture knowledge for depth and hidden-size pruning: which config fields depend on the
layer count, which per-module attributes index a layer, and which families scale their
embeddings by ``sqrt(hidden_size)``.

Depth pruning keeps the blocks ``keep`` (old indices, ascending) and rewrites the config with
:func:`remove_layers_from_config`:

* the layer count (``num_hidden_layers``; GPT-2's ``n_layer`` through its ``attribute_map``);
* per-layer lists, one entry per block (:data:`PER_LAYER_LISTS`, and any other list or tuple
  with exactly one entry per block, e.g. ``layer_types``): the kept entries;
* layer-index sets (:data:`LAYER_INDEX_SETS`, e.g. Qwen-MoE ``mlp_only_layers``): kept indices,
  renumbered;
* layer-kind rules: Qwen-MoE ``decoder_sparse_step`` (a block is MoE when ``(i + 1) % step == 0``
  and ``i`` is not in ``mlp_only_layers``) is rewritten as ``decoder_sparse_step=1`` plus the
  renumbered dense blocks in ``mlp_only_layers``; DeepSeek-style dense prefixes
  (``first_k_dense_replace``, ``num_dense_layers``) count the kept dense blocks;
  ``moe_layer_start_index`` / ``moe_layer_end_index`` follow the kept MoE range.

Blocks are renumbered with :func:`reindex_block` (every ``layer_idx`` attribute: the KV cache and
the per-layer config lookups index by it). :func:`hfprune.structured.stock.stock_mismatch` then
checks that the rewritten config rebuilds exactly the pruned modules.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["PRUNED_SHAPES_KEY", "PER_LAYER_LISTS", "LAYER_INDEX_SETS", "LAYER_INDEX_ATTRS", "SQRT_HIDDEN_EMBED_SCALE", "NORM_WEIGHT_OFFSET",
           "num_layers_of", "remove_layers_from_config", "reindex_block", "layer_order_warnings"]

PRUNED_SHAPES_KEY = "pruned_shapes"
"""The config.json key of a non-uniform structured checkpoint: each block's head and neuron counts
(:class:`hfprune.structured.AutoPrunedModelForCausalLM` rebuilds the blocks from it)."""

PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "no_rope_layers", "indexer_types", "kv_sharing_modes",
                   "layers_block_type", "layers_num_experts", "per_layer_config", "swiglu_limits",
                   "swiglu_limits_shared", "attention_window")
"""Config fields with one entry per decoder block (transformers reads ``config.<field>[layer_idx]``)."""

LAYER_INDEX_SETS = ("mlp_only_layers", "moe_layers", "rope_scaling_layers")
"""Config fields holding a set of block indices (``layer_idx in config.<field>``)."""

LAYER_INDEX_ATTRS = ("layer_idx",)
"""Per-module attributes holding the block's index (attention ``layer_idx`` indexes the KV cache)."""

_DEPTH_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

SQRT_HIDDEN_EMBED_SCALE = {"gemma": "model.norm", "gemma2": "model.norm", "gemma3_text": "model.norm"}
"""Families whose input embeddings are multiplied by ``sqrt(hidden_size)`` in the forward pass,
with the path of their final norm (hidden-size pruning rescales the embedding matrix so the
scale change is undone, and, with tied embeddings, the final norm so the logits are unchanged)."""

NORM_WEIGHT_OFFSET = {"gemma": 1.0, "gemma2": 1.0, "gemma3_text": 1.0}
"""Families whose RMSNorm multiplies by ``offset + weight`` (Gemma: ``1 + weight``)."""


def num_layers_of(config) -> int:
    for attr in _DEPTH_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(f"{type(config).__name__} has no layer-count field ({', '.join(_DEPTH_ATTRS)}).")


def _is_moe_layer(config, i: int) -> bool | None:
    """Whether block ``i`` is an MoE block according to the config's layer-kind rules (``None``
    when the config has no such rule)."""
    step = getattr(config, "decoder_sparse_step", None)
    if isinstance(step, int) and step > 0:
        experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0
        dense = set(getattr(config, "mlp_only_layers", None) or ())
        return i not in dense and experts > 0 and (i + 1) % step == 0
    for attr in ("first_k_dense_replace", "num_dense_layers"):
        k = getattr(config, attr, None)
        if isinstance(k, int):
            return i >= k
    start, end = getattr(config, "moe_layer_start_index", None), getattr(config, "moe_layer_end_index", None)
    if isinstance(start, int) and isinstance(end, int):
        return start <= i <= end
    return None


def remove_layers_from_config(config, keep: list[int]) -> dict[str, Any]:
    """Rewrite ``config`` in place for a model that keeps only blocks ``keep`` (old indices);
    returns ``{field: (before, after)}`` of every field changed."""
    n_before = num_layers_of(config)
    keep = sorted(int(i) for i in keep)
    if not keep or keep[0] < 0 or keep[-1] >= n_before or len(set(keep)) != len(keep):
        raise ValueError(f"keep={keep} is not a set of block indices of a {n_before}-block model.")
    new_index = {old: new for new, old in enumerate(keep)}
    changes: dict[str, Any] = {}

    def set_field(name, value):
        before = getattr(config, name, None)
        if before != value:
            changes[name] = (before, value)
            setattr(config, name, value)

    moe_kinds = [_is_moe_layer(config, i) for i in range(n_before)]
    kept_kinds = [moe_kinds[i] for i in keep]

    known = set(PER_LAYER_LISTS) | set(LAYER_INDEX_SETS)
    for name, value in list(vars(config).items()):
        if name.startswith("_") or name in LAYER_INDEX_SETS:
            continue
        if isinstance(value, (list, tuple)) and len(value) == n_before and n_before > 1:
            if name not in known:
                logger.info("config.%s has one entry per block; keeping the entries of the kept blocks.", name)
            set_field(name, type(value)(value[i] for i in keep))
        elif name in PER_LAYER_LISTS and isinstance(value, (list, tuple)):
            raise ValueError(f"config.{name} has {len(value)} entries but the model has {n_before} blocks; fix the "
                             f"config before depth pruning.")
    for name in LAYER_INDEX_SETS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            set_field(name, type(value)(new_index[i] for i in value if i in new_index))

    if moe_kinds[0] is not None:
        if isinstance(getattr(config, "decoder_sparse_step", None), int):
            if [_is_moe_layer(config, i) for i in range(len(keep))] != kept_kinds:
                set_field("decoder_sparse_step", 1)
                set_field("mlp_only_layers", [j for j, moe in enumerate(kept_kinds) if not moe])
        for attr in ("first_k_dense_replace", "num_dense_layers"):
            if isinstance(getattr(config, attr, None), int):
                set_field(attr, sum(1 for moe in kept_kinds if not moe))
        if isinstance(getattr(config, "moe_layer_start_index", None), int):
            moe_new = [j for j, moe in enumerate(kept_kinds) if moe]
            if moe_new:
                set_field("moe_layer_start_index", moe_new[0])
                set_field("moe_layer_end_index", moe_new[-1])
    set_field("num_hidden_layers", len(keep))
    if moe_kinds[0] is not None:
        after = [_is_moe_layer(config, j) for j in range(len(keep))]
        if after != kept_kinds:
            raise ValueError(f"The config's MoE layer rule cannot describe the kept blocks {keep} (MoE pattern "
                             f"{kept_kinds}); choose other blocks to remove.")
    return changes


def reindex_block(block: nn.Module, index: int) -> None:
    """Set every layer-index attribute inside ``block`` to ``index``."""
    for module in block.modules():
        for attr in LAYER_INDEX_ATTRS:
            if isinstance(getattr(module, attr, None), int) and not isinstance(getattr(module, attr), bool):
                setattr(module, attr, index)


def layer_order_warnings(config) -> list[str]:
    """Config options under which a block's computation depends on its index, so a renumbered
    block does not compute what it did before (reported, not refused)."""
    out = []
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        out.append("scale_attn_by_inverse_layer_idx=True scales attention by 1/(layer_idx+1): kept blocks that move "
                   "to a lower index change their attention scale")
    return out
