"""Tiny random configs of any transformers model type, for tests and the conformance benchmark.

:func:`tiny_config` starts from the type's own defaults (``AutoConfig.for_model``) and shrinks
every size field it recognises, in the config and in each of its sub-configs (text, vision, ...):
2 layers, hidden 64, 4 heads of 16 (2 key/value heads), MLP 128, 8 experts of width 32 with 2 per
token, vocabulary 320. Per-layer lists (``layer_types`` and the like) are cut to the new depth
keeping one of each kind, so hybrid stacks keep their attention and linear-attention layers.
No table of model types is involved; a type whose defaults do not shrink this way raises the
config class's own error, which the benchmark records as the reason.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["tiny_config", "TINY_SIZES"]

LAYERS = 2
TINY_SIZES: dict[str, int] = {
    # depth
    **{k: LAYERS for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers",
                           "decoder_layers", "num_decoder_layers", "num_encoder_layers")},
    # widths
    **{k: 64 for k in ("hidden_size", "n_embd", "d_model", "word_embed_proj_dim", "embedding_size",
                       "input_embedding_size", "output_embedding_size", "attention_hidden_size", "lru_width")},
    **{k: 128 for k in ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff",
                        "intermediate_size_mlp", "ffn_hidden_size", "dense_intermediate_size", "dim_ff",
                        "feed_forward_size", "d_inner")},
    **{k: 32 for k in ("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
                       "shared_experts_intermediate_size", "moe_shared_expert_intermediate_size",
                       "expert_ffn_hidden_size", "q_lora_rank", "kv_lora_rank")},
    # attention
    **{k: 4 for k in ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
                      "decoder_attention_heads", "swa_num_attention_heads", "linear_num_value_heads",
                      "attention_heads")},
    **{k: 2 for k in ("num_key_value_heads", "swa_num_key_value_heads", "num_kv_heads", "num_query_groups",
                      "linear_num_key_heads", "index_n_heads", "multi_query_group_num")},
    **{k: 16 for k in ("head_dim", "swa_head_dim", "attention_head_dim", "kv_channels", "qk_nope_head_dim",
                       "v_head_dim", "linear_key_head_dim", "linear_value_head_dim", "index_head_dim",
                       "linear_head_dim", "attention_head_size", "d_head", "dim_head")},
    "qk_rope_head_dim": 8,
    "qk_head_dim": 24,
    "index_topk": 8,
    # experts
    **{k: 8 for k in ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")},
    **{k: 2 for k in ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k")},
    **{k: 1 for k in ("n_group", "topk_group", "num_expert_group", "first_k_dense_replace")},
    # tokens and positions
    "vocab_size": 320,
    "max_position_embeddings": 512,
    "n_positions": 512,
}
_CAPS = {"sliding_window": 16, "attention_window_size": 16, "sliding_window_size": 16, "rotary_dim": 8}
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
              "decoder_start_token_id", "mask_token_id")
_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _shrink_layer_list(values: list, depth: int) -> list:
    """A per-layer list cut to ``depth`` entries, one of each distinct kind first (then cycled)."""
    kinds: list = []
    for v in values:
        if v not in kinds:
            kinds.append(v)
    return [kinds[i % len(kinds)] for i in range(depth)]


def _shrink(d: dict[str, Any], sizes: dict[str, int]) -> dict[str, Any]:
    d = copy.deepcopy(d)
    depth = next((d[k] for k in _DEPTH_KEYS if isinstance(d.get(k), int)), None)
    new_depth = next((sizes[k] for k in _DEPTH_KEYS if k in d and k in sizes), LAYERS)  # per-layer lists follow it
    for key, value in list(d.items()):
        if isinstance(value, dict) and ("model_type" in value or any(k in value for k in sizes)):
            d[key] = _shrink(value, sizes)
        elif key in sizes and isinstance(value, int) and not isinstance(value, bool):
            d[key] = min(value, sizes[key]) if key in ("first_k_dense_replace",) else sizes[key]
        elif key in _CAPS and isinstance(value, int) and not isinstance(value, bool):
            d[key] = min(value, _CAPS[key])
        elif isinstance(value, list) and depth and len(value) == depth and depth > new_depth:
            d[key] = _shrink_layer_list(value, new_depth)
        elif key == "per_layer_config" and isinstance(value, dict) and value:
            # {layer index: overrides}: keep one overridden layer, the last one of the tiny stack
            first = value[sorted(value, key=int)[0]]
            d[key] = {str(new_depth - 1) if isinstance(next(iter(value)), str) else new_depth - 1: first}
    if isinstance(d.get("qk_rope_head_dim"), int):
        # Multi-head latent attention: the rotary part is the "head_dim" the rotary embedding reads.
        if "head_dim" in d:
            d["head_dim"] = d["qk_rope_head_dim"]
        if "qk_head_dim" in d and isinstance(d.get("qk_nope_head_dim"), int):
            d["qk_head_dim"] = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
    if isinstance(d.get("kv_lora_rank"), int) and isinstance(d.get("num_key_value_heads"), int):
        d["num_key_value_heads"] = d.get("num_attention_heads", d["num_key_value_heads"])  # MLA has no GQA
    vocab = d.get("vocab_size")
    if isinstance(vocab, int):
        for key in _TOKEN_IDS:
            v = d.get(key)
            if isinstance(v, int) and v >= vocab:
                d[key] = vocab - 1 - _TOKEN_IDS.index(key)
            elif isinstance(v, list):
                d[key] = [x if x < vocab else vocab - 1 for x in v if isinstance(x, int)]
    return d


def tiny_config(model_type: str, sizes: dict[str, int] | None = None, **overrides):
    """A tiny config of ``model_type`` built from the type's defaults (see the module docstring).

    ``sizes`` replaces entries of :data:`TINY_SIZES`; ``overrides`` are set on the result.
    """
    from transformers import AutoConfig

    table = {**TINY_SIZES, **(sizes or {})}
    base = AutoConfig.for_model(model_type)
    small = _shrink(base.to_dict(), table)
    small.pop("model_type", None)
    small.pop("transformers_version", None)
    config = type(base).from_dict(small)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config
