"""Architecture knowledge: the table of how each model family is laid out, and the lookups on it.

Everything else in hfprune asks this package for the decoder blocks of a model, the prunable
linear layers of a block, the ``[out_features, in_features]`` view of a weight, and (for
structured pruning) which projections belong to attention and MLP and which config fields hold
their sizes.

To support a new family, add one :class:`ArchSpec` to :data:`ARCHITECTURES` (the architecture
:class:`~hfprune.registry.Registry`; or call :func:`register_architecture` from user code) and one
row to the architecture test table.

Imports point down inside the package: ``base`` (the table, :func:`get_spec`, :func:`find_linears`)
-> ``discovery`` (layouts found by name) -> ``moe`` (fused experts) -> ``spec`` (:class:`ArchSpec`,
config sizes) -> ``modules`` (module helpers, a leaf). This module re-exports the names of ``spec``
and ``modules`` so ``hfprune.arch`` is the one import for users.
"""

from __future__ import annotations

import logging

from torch import nn

from hfprune.arch.discovery import discover_spec
from hfprune.arch.moe import active_expert_linears
from hfprune.arch.modules import (Conv1D, _get_path, get_submodule, in_features, is_linear,  # noqa: F401
                                  set_attention_sizes, set_mlp_size, weight_matrix)
from hfprune.arch.spec import (ArchSpec, block_list, check_seqlen, head_dim_configurable, head_dim_of,  # noqa: F401
                               intermediate_size_of, max_positions, num_heads_of, num_kv_heads_of)
from hfprune.registry import ARCHITECTURES

logger = logging.getLogger(__name__)

__all__ = [
    "ArchSpec", "ARCHITECTURES", "Conv1D", "register_architecture", "get_spec", "get_blocks", "get_submodule",
    "find_linears", "weight_matrix", "in_features", "is_linear", "num_heads_of", "num_kv_heads_of", "head_dim_of",
    "intermediate_size_of", "head_dim_configurable", "max_positions", "check_seqlen", "set_attention_sizes",
    "set_mlp_size",
]


_LLAMA_LIKE = ArchSpec(layers="model.layers")

ARCHITECTURES.update({
    "llama": ArchSpec(layers="model.layers", attention_bias_attr="attention_bias",
                      mlp_bias_attr="mlp_bias"),
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": ArchSpec(layers="model.layers", attention_bias_attr="attention_bias"),
    "gemma": ArchSpec(layers="model.layers", attention_bias_attr="attention_bias"),
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": ArchSpec(layers="model.layers", q=None, k=None, v=None, qkv="self_attn.qkv_proj",
                     gate=None, up=None, gate_up="mlp.gate_up_proj"),
    "phi": ArchSpec(layers="model.layers", o="self_attn.dense", gate=None, up="mlp.fc1",
                    down="mlp.fc2"),
    "opt": ArchSpec(layers="model.decoder.layers", o="self_attn.out_proj", gate=None, up="fc1",
                    down="fc2", kv_heads_attr=None, intermediate_attr="ffn_dim", head_dim_attr=None),
    "gpt2": ArchSpec(layers="transformer.h", q=None, k=None, v=None, qkv="attn.c_attn",
                     o="attn.c_proj", gate=None, up="mlp.c_fc", down="mlp.c_proj",
                     heads_attr="n_head", kv_heads_attr=None, intermediate_attr="n_inner",
                     head_dim_attr=None, hidden_attr="n_embd"),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", q=None, k=None, v=None,
                         qkv="attention.query_key_value", o="attention.dense", gate=None,
                         up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h", kv_heads_attr=None,
                         head_dim_attr=None, qkv_layout="per_head",
                         attention_bias_attr="attention_bias"),
})


def register_architecture(model_type: str, spec: ArchSpec, *, overwrite: bool = False) -> None:
    """Teach hfprune a new ``config.model_type``.

    Example:
        >>> from hfprune.arch import ArchSpec, register_architecture
        >>> register_architecture("my_llama", ArchSpec(layers="model.layers"))
    """
    ARCHITECTURES.register(model_type, spec, overwrite=overwrite)


def get_spec(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` of ``model``: the table entry for ``model.config.model_type`` when
    there is one (overrides for odd layouts), else the layout discovered from transformers'
    metadata (:func:`hfprune.arch.discovery.discover_spec`)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if config is None or not isinstance(model, nn.Module) or not hasattr(model, "named_modules"):
        raise ValueError(f"hfprune needs a transformers model with a `config`; got {type(model).__name__}. "
                         f"Describe its layout with `hfprune.register_architecture(...)`.")
    cached = model.__dict__.get("_hfprune_spec")
    if cached is not None and cached[0] == model_type:
        return cached[1]
    spec = discover_spec(model)
    model.__dict__["_hfprune_spec"] = (model_type, spec)
    return spec


def get_blocks(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    """The decoder blocks of ``model`` in execution order (``spec`` defaults to :func:`get_spec`)."""
    return block_list(model, spec or get_spec(model))


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """All prunable linear layers inside ``block``, by their name relative to the block.

    While :func:`hfprune.arch.moe.linearized` is active, fused 3-D expert parameters are listed
    too, one ``[out, in]`` view per expert (``mlp.experts.3.down_proj``)."""
    out = {}
    for name, mod in block.named_modules():
        if name and is_linear(mod):
            out[name] = mod
        views = active_expert_linears(mod) if name else None
        if views:
            out.update({f"{name}.{rel}": lin for rel, lin in views.items()})
    return out
