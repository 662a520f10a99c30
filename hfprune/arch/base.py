"""Architecture knowledge: the one place that knows how each model family is laid out.

Everything else in hfprune asks this module for the decoder blocks of a model, the prunable
linear layers of a block, the ``[out_features, in_features]`` view of a weight, and (for
structured pruning) which projections belong to attention and MLP and which config fields hold
their sizes.

To support a new family, add one :class:`ArchSpec` to :data:`ARCHITECTURES` (the architecture
:class:`~hfprune.registry.Registry`; or call :func:`register_architecture` from user code) and one
row to the architecture test table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from hfprune.registry import ARCHITECTURES

logger = logging.getLogger(__name__)

try:  # GPT-2 style "Conv1D" is a linear layer with a transposed weight ([in, out]).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always has it today
    Conv1D = ()

__all__ = [
    "ArchSpec", "ARCHITECTURES", "Conv1D", "register_architecture", "get_spec", "get_blocks", "get_submodule",
    "find_linears", "weight_matrix", "in_features", "is_linear", "num_heads_of", "num_kv_heads_of", "head_dim_of",
    "intermediate_size_of", "head_dim_configurable", "max_positions", "check_seqlen", "set_attention_sizes",
    "set_mlp_size",
]


@dataclass(frozen=True)
class ArchSpec:
    """How one model family is laid out.

    Paths are dotted attribute paths; ``layers`` is relative to the model, every other path is
    relative to one decoder block. ``None`` means the family has no such module.
    """

    layers: str
    """Path of the ``nn.ModuleList`` of decoder blocks (e.g. ``model.layers``)."""
    q: str | None = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    qkv: str | None = None
    """Fused query/key/value projection (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``)."""
    o: str | None = "self_attn.o_proj"
    gate: str | None = "mlp.gate_proj"
    up: str | None = "mlp.up_proj"
    gate_up: str | None = None
    """Fused gate/up projection (Phi-3 ``gate_up_proj``: gate rows first, then up rows)."""
    down: str | None = "mlp.down_proj"
    heads_attr: str = "num_attention_heads"
    kv_heads_attr: str | None = "num_key_value_heads"
    intermediate_attr: str | None = "intermediate_size"
    head_dim_attr: str | None = "head_dim"
    hidden_attr: str = "hidden_size"
    qkv_layout: str = "concat"
    """Row layout of the fused ``qkv`` projection: ``"concat"`` (all query rows, then all key
    rows, then all value rows: Phi-3, GPT-2) or ``"per_head"`` (for every head its query, key and
    value rows in turn, ``3 * head_dim`` rows per head: GPT-NeoX)."""
    attention_bias_attr: str | None = None
    """Config flag that gives q/k/v/o (or qkv/o) a bias (Llama ``attention_bias``); ``None`` when
    the family has no such flag (then a missing bias cannot be added in a reloadable way)."""
    mlp_bias_attr: str | None = None
    """Config flag that gives gate/up/down a bias (Llama ``mlp_bias``); ``None`` when absent."""
    experts: tuple[str, ...] = ()
    """Block-relative paths of MoE expert containers (fused 3-D experts modules or ``experts``
    ModuleLists), see :mod:`hfprune.arch.moe`."""
    routers: tuple[str, ...] = ()
    """Block-relative paths of linear MoE routers; they stay dense unless named in ``targets``."""
    stacks: tuple[str, ...] = ()
    """Further block lists pruned after ``layers``, in turn (an encoder-decoder's decoder stack:
    ``layers`` is the encoder, so the decoder is calibrated on the pruned encoder's outputs)."""
    discovered: bool = False
    """True when :mod:`hfprune.arch.discovery` found this layout (no table entry)."""

    def attention_paths(self) -> list[str]:
        return [p for p in (self.q, self.k, self.v, self.qkv, self.o) if p]

    def mlp_paths(self) -> list[str]:
        return [p for p in (self.gate, self.up, self.gate_up, self.down) if p]


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
    from hfprune.arch.discovery import discover_spec

    cached = model.__dict__.get("_hfprune_spec")
    if cached is not None and cached[0] == model_type:
        return cached[1]
    spec = discover_spec(model)
    model.__dict__["_hfprune_spec"] = (model_type, spec)
    return spec


def _get_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def get_submodule(block: nn.Module, path: str | None) -> nn.Module | None:
    """The module at ``path`` inside ``block`` or ``None`` when the path is ``None``/absent."""
    if path is None:
        return None
    try:
        return _get_path(block, path)
    except AttributeError:
        return None


def get_blocks(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    """The decoder blocks of ``model`` in execution order, and their dotted prefix."""
    spec = spec or get_spec(model)
    try:
        blocks = _get_path(model, spec.layers)
    except AttributeError as err:
        raise ValueError(
            f"Model {type(model).__name__} has no attribute path {spec.layers!r} for its decoder "
            f"blocks; fix the ArchSpec registered for {model.config.model_type!r}."
        ) from err
    return blocks


def is_linear(module: nn.Module) -> bool:
    """True for the layer types hfprune prunes: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """All prunable linear layers inside ``block``, by their name relative to the block.

    While :func:`hfprune.arch.moe.linearized` is active, fused 3-D expert parameters are listed
    too, one ``[out, in]`` view per expert (``mlp.experts.3.down_proj``)."""
    from hfprune.arch.moe import active_expert_linears

    out = {}
    for name, mod in block.named_modules():
        if name and is_linear(mod):
            out[name] = mod
        views = active_expert_linears(mod) if name else None
        if views:
            out.update({f"{name}.{rel}": lin for rel, lin in views.items()})
    return out


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as an ``[out_features, in_features]`` tensor that shares storage with the
    parameter (a transposed view for GPT-2's ``Conv1D``), so in-place writes reach the model."""
    weight = module.weight.data
    if bool(Conv1D) and isinstance(module, Conv1D):
        return weight.t()
    return weight


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]


# --- Sizes read from a config (used by structured pruning) -------------------------------------


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover (``None`` when the config does
    not say: rotary models without a limit)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_seqlen(config, seqlen: int, what: str) -> None:
    """Refuse windows longer than the model's positions (GPT-2 would index past its table)."""
    limit = max_positions(config)
    if limit is not None and seqlen > limit:
        raise ValueError(f"{what} is {seqlen} tokens, but the model covers at most {limit} positions "
                         f"(config max_position_embeddings / n_positions): lower it to {limit} or less.")


def num_heads_of(config, spec: ArchSpec) -> int:
    """Number of query heads in ``config`` (``spec.heads_attr``)."""
    return int(getattr(config, spec.heads_attr))


def num_kv_heads_of(config, spec: ArchSpec) -> int:
    """Number of key/value heads; families without the field (or with it unset) are multi-head
    attention, so this is the number of query heads."""
    value = getattr(config, spec.kv_heads_attr, None) if spec.kv_heads_attr else None
    return int(value) if value else num_heads_of(config, spec)


def head_dim_of(config, spec: ArchSpec) -> int:
    """Per-head size: the config's ``head_dim`` field when the family has one and it is set,
    else ``hidden_size // num_heads`` (what the modeling code derives)."""
    value = getattr(config, spec.head_dim_attr, None) if spec.head_dim_attr else None
    if value:
        return int(value)
    return int(getattr(config, spec.hidden_attr)) // num_heads_of(config, spec)


def intermediate_size_of(config, spec: ArchSpec) -> int | None:
    """MLP width. GPT-2 style configs leave ``n_inner`` as ``None``, meaning ``4 * hidden``."""
    if spec.intermediate_attr is None:
        return None
    value = getattr(config, spec.intermediate_attr, None)
    if value is None:
        return 4 * int(getattr(config, spec.hidden_attr))
    return int(value)


def set_attention_sizes(attn: nn.Module, n_heads: int, n_kv: int, head_dim: int) -> None:
    """Write new head counts into the int attributes an attention module reads at forward time, where it
    has them: ``num_heads`` (GPT-2, OPT), ``num_key_value_groups`` (Llama family's ``repeat_kv``),
    ``num_key_value_heads`` (Phi-3 qkv split), ``split_size`` (GPT-2 qkv split)."""
    sizes = {"num_heads": n_heads, "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "num_kv_heads": n_kv,
             "num_key_value_groups": n_heads // max(n_kv, 1), "split_size": n_heads * head_dim}
    for name, value in sizes.items():
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value)


def set_mlp_size(mlp: nn.Module, inter: int) -> None:
    """Write a new MLP width into the module's ``intermediate_size`` attribute, where it has one."""
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = inter


def head_dim_configurable(spec: ArchSpec) -> bool:
    """True when the family's config has a ``head_dim`` field that the modeling code reads, so the
    number of heads can change while ``head_dim`` stays (Llama, Qwen2, Mistral, Phi-3). GPT-2,
    OPT and GPT-NeoX derive ``head_dim = hidden // num_heads`` and have no such field."""
    return spec.head_dim_attr is not None

