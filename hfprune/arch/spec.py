"""What an architecture is: :class:`ArchSpec` (where the blocks and projections of a model family are,
which config fields hold their sizes), the block list it points at (:func:`block_list`), and the
sizes read from a config with it. Imports only :mod:`hfprune.arch.modules`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hfprune.arch.modules import _get_path

__all__ = ["ArchSpec", "block_list", "num_heads_of", "num_kv_heads_of", "head_dim_of", "intermediate_size_of",
           "head_dim_configurable", "max_positions", "check_seqlen"]


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


def block_list(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The decoder blocks of ``model`` in execution order, at ``spec.layers``
    (:func:`hfprune.arch.get_blocks` finds the spec when none is given)."""
    try:
        blocks = _get_path(model, spec.layers)
    except AttributeError as err:
        raise ValueError(
            f"Model {type(model).__name__} has no attribute path {spec.layers!r} for its decoder "
            f"blocks; fix the ArchSpec registered for {model.config.model_type!r}."
        ) from err
    return blocks


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


def head_dim_configurable(spec: ArchSpec) -> bool:
    """True when the family's config has a ``head_dim`` field that the modeling code reads, so the
    number of heads can change while ``head_dim`` stays (Llama, Qwen2, Mistral, Phi-3). GPT-2,
    OPT and GPT-NeoX derive ``head_dim = hidden // num_heads`` and have no such field."""
    return spec.head_dim_attr is not None
