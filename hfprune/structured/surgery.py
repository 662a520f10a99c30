"""Structured surgery: slice projections, patch the attention/MLP attributes the modeling code reads."""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

from hfprune.arch import ArchSpec, Conv1D, get_submodule, head_dim_of, set_attention_sizes, set_mlp_size, weight_matrix
from hfprune.stats import ChannelStats

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Module surgery helpers
# --------------------------------------------------------------------------------------------


class LayerConfigView:
    """A model config seen by one block: a few per-block overrides (e.g. ``num_attention_heads``),
    every other read and write goes to the shared model config. Installed as the attention
    module's ``config`` when blocks differ, because some modeling code (Phi-3) reads
    ``self.config.num_attention_heads`` at forward time."""

    __slots__ = ("_base", "_overrides")

    def __init__(self, base, overrides: Mapping[str, object]):
        if isinstance(base, LayerConfigView):
            base = object.__getattribute__(base, "_base")
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", dict(overrides))

    def __getattr__(self, name):
        try:
            overrides = object.__getattribute__(self, "_overrides")
            base = object.__getattribute__(self, "_base")
        except AttributeError:
            raise AttributeError(name) from None
        if name in overrides:
            return overrides[name]
        return getattr(base, name)

    def __setattr__(self, name, value):
        if name in self._overrides:
            self._overrides[name] = value
        else:
            setattr(self._base, name, value)

    def __reduce__(self):
        return (LayerConfigView, (self._base, self._overrides))

    def __repr__(self) -> str:
        return f"LayerConfigView({type(self._base).__name__}, overrides={self._overrides})"


def parent(block: nn.Module, path: str | None) -> nn.Module | None:
    if not path or "." not in path:
        return None
    return get_submodule(block, path.rsplit(".", 1)[0])


def _slice_linear(module: nn.Module, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None) -> None:
    """Keep only the given output rows / input columns of an ``nn.Linear`` or ``Conv1D`` in place."""
    weight = module.weight
    w = weight.data
    conv = bool(Conv1D) and isinstance(module, Conv1D)
    out_dim, in_dim = (1, 0) if conv else (0, 1)
    if out_index is not None:
        w = w.index_select(out_dim, out_index.to(w.device))
    if in_index is not None:
        w = w.index_select(in_dim, in_index.to(w.device))
    module.weight = nn.Parameter(w.contiguous(), requires_grad=weight.requires_grad)
    if out_index is not None and getattr(module, "bias", None) is not None:
        bias = module.bias
        module.bias = nn.Parameter(bias.data.index_select(0, out_index.to(bias.device)).contiguous(),
                                   requires_grad=bias.requires_grad)
    if conv:
        module.nx, module.nf = w.shape
    else:
        module.out_features, module.in_features = w.shape


def _add_zero_bias(module: nn.Module) -> None:
    if getattr(module, "bias", None) is None:
        w = module.weight
        module.bias = nn.Parameter(torch.zeros(weight_matrix(module).shape[0], dtype=w.dtype, device=w.device),
                                   requires_grad=w.requires_grad)


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


def _qkv_rows(spec: ArchSpec, part: str, heads: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """Row indices of ``part`` (q/k/v) of ``heads`` inside the fused qkv projection."""
    slot = "qkv".index(part)
    if spec.qkv_layout == "per_head":
        return (heads[:, None] * 3 * head_dim + slot * head_dim
                + torch.arange(head_dim, device=heads.device)).reshape(-1)
    if spec.qkv_layout != "concat":
        raise ValueError(f"Unknown qkv_layout {spec.qkv_layout!r} in the ArchSpec; use 'concat' or 'per_head'.")
    offset = (0, n_heads * head_dim, (n_heads + n_kv) * head_dim)[slot]
    return offset + head_rows(heads, head_dim)


def block_shapes(block: nn.Module, spec: ArchSpec, config) -> tuple[int, int, int, int | None]:
    """``(num_heads, num_kv_heads, head_dim, intermediate)`` of a block, read from its modules."""
    head_dim = head_dim_of(config, spec)
    o = get_submodule(block, spec.o)
    n_heads = n_kv = 0
    if o is not None:
        n_heads = weight_matrix(o).shape[1] // head_dim
        qkv = get_submodule(block, spec.qkv)
        k = get_submodule(block, spec.k)
        if qkv is not None:
            rows = weight_matrix(qkv).shape[0]
            n_kv = n_heads if spec.qkv_layout == "per_head" else (rows - n_heads * head_dim) // (2 * head_dim)
        elif k is not None:
            n_kv = weight_matrix(k).shape[0] // head_dim
        else:
            n_kv = n_heads
    down = get_submodule(block, spec.down)
    inter = weight_matrix(down).shape[1] if down is not None else None
    return n_heads, n_kv, head_dim, inter


def q_weight(block: nn.Module, spec: ArchSpec, n_heads: int, n_kv: int, hd: int) -> torch.Tensor:
    q = get_submodule(block, spec.q)
    if q is not None:
        return weight_matrix(q)
    w = weight_matrix(get_submodule(block, spec.qkv))
    return w[_qkv_rows(spec, "q", torch.arange(n_heads, device=w.device), n_heads, n_kv, hd)]


def kv_sq_norms(block: nn.Module, spec: ArchSpec, n_heads: int, n_kv: int, hd: int) -> torch.Tensor:
    """Squared norm of each KV head's key and value rows."""
    qkv = get_submodule(block, spec.qkv)
    if qkv is not None:
        w = weight_matrix(qkv)
        heads = torch.arange(n_kv, device=w.device)
        rows = [w[_qkv_rows(spec, p, heads, n_heads, n_kv, hd)] for p in "kv"]
    else:
        rows = [weight_matrix(get_submodule(block, p)) for p in (spec.k, spec.v)]
    return sum(r.double().pow(2).sum(1).view(n_kv, hd).sum(1) for r in rows)


def mlp_in_weights(block: nn.Module, spec: ArchSpec, inter: int) -> list[torch.Tensor]:
    fused = get_submodule(block, spec.gate_up)
    if fused is not None:
        w = weight_matrix(fused)
        return [w[:inter], w[inter:]]
    return [weight_matrix(m) for m in (get_submodule(block, spec.gate), get_submodule(block, spec.up)) if m is not None]


def set_attention_attrs(attn: nn.Module | None, spec: ArchSpec, n_heads: int, n_kv: int, head_dim: int,
                         per_block_config: bool) -> None:
    """Update the attributes attention modules read at forward time (:func:`hfprune.arch.set_attention_sizes`)
    and, for per-block shapes, install a :class:`LayerConfigView` for code that reads ``self.config`` (Phi-3)."""
    if attn is None:
        return
    set_attention_sizes(attn, n_heads, n_kv, head_dim)
    config = getattr(attn, "config", None)
    if config is None:
        return
    overrides = {spec.heads_attr: n_heads}
    if spec.kv_heads_attr:
        overrides[spec.kv_heads_attr] = n_kv
    if spec.head_dim_attr:
        overrides[spec.head_dim_attr] = head_dim
    if isinstance(config, LayerConfigView):
        for key, value in overrides.items():
            config._overrides[key] = value
    elif per_block_config:
        attn.config = LayerConfigView(config, overrides)


def set_mlp_attrs(mlp: nn.Module | None, spec: ArchSpec, inter: int, per_block_config: bool) -> None:
    if mlp is None:
        return
    set_mlp_size(mlp, inter)
    config = getattr(mlp, "config", None)
    if config is None or spec.intermediate_attr is None:
        return
    if isinstance(config, LayerConfigView):
        config._overrides[spec.intermediate_attr] = inter
    elif per_block_config:
        mlp.config = LayerConfigView(config, {spec.intermediate_attr: inter})


def slice_attention(block: nn.Module, spec: ArchSpec, n_heads: int, n_kv: int, hd: int,
                     keep_heads: torch.Tensor, keep_kv: torch.Tensor) -> None:
    q_rows = head_rows(keep_heads, hd)
    qkv = get_submodule(block, spec.qkv)
    if qkv is not None:
        rows = torch.cat([_qkv_rows(spec, "q", keep_heads, n_heads, n_kv, hd),
                          _qkv_rows(spec, "k", keep_kv, n_heads, n_kv, hd),
                          _qkv_rows(spec, "v", keep_kv, n_heads, n_kv, hd)]).sort().values
        _slice_linear(qkv, out_index=rows)
    else:
        kv_rows = head_rows(keep_kv, hd)
        _slice_linear(get_submodule(block, spec.q), out_index=q_rows)
        for path in (spec.k, spec.v):
            _slice_linear(get_submodule(block, path), out_index=kv_rows)
    _slice_linear(get_submodule(block, spec.o), in_index=q_rows)


def slice_mlp(block: nn.Module, spec: ArchSpec, inter: int, keep: torch.Tensor) -> None:
    fused = get_submodule(block, spec.gate_up)
    if fused is not None:
        _slice_linear(fused, out_index=torch.cat([keep, keep + inter]))
    for path in (spec.gate, spec.up):
        module = get_submodule(block, path)
        if module is not None:
            _slice_linear(module, out_index=keep)
    _slice_linear(get_submodule(block, spec.down), in_index=keep)


def shrink_block(block: nn.Module, spec: ArchSpec, shape: tuple, keep_heads: torch.Tensor | None = None,
                 keep_kv: torch.Tensor | None = None, keep_neurons: torch.Tensor | None = None) -> None:
    """Keep only the given heads (with their KV heads) and/or MLP neurons of a block of
    :func:`block_shapes` ``shape``, and update the attributes its modules read at forward time."""
    n_heads, n_kv, hd, inter = shape
    if keep_heads is not None:
        slice_attention(block, spec, n_heads, n_kv, hd, keep_heads, keep_kv)
        set_attention_attrs(parent(block, spec.o), spec, len(keep_heads), len(keep_kv), hd, per_block_config=False)
    if keep_neurons is not None:
        slice_mlp(block, spec, inter, keep_neurons)
        set_mlp_attrs(parent(block, spec.down), spec, len(keep_neurons), per_block_config=False)


def block_report(entry: dict, shape: tuple, keep_heads: torch.Tensor, keep_kv: torch.Tensor,
                 keep_neurons: torch.Tensor | None) -> dict:
    """``entry`` (a block's report) completed with its counts after :func:`shrink_block` and the kept heads."""
    inter = shape[3]
    n_removed = 0 if keep_neurons is None else inter - len(keep_neurons)
    entry.update(heads_after=len(keep_heads), kv_heads_after=len(keep_kv),
                 neurons_after=None if inter is None else inter - n_removed,
                 kept_heads=keep_heads.tolist(), kept_kv_heads=keep_kv.tolist(), neurons_removed=n_removed)
    return entry


def complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool, device=keep.device)
    mask[keep] = False
    return mask.nonzero().flatten()


def add_bias_delta(module: nn.Module, removed: torch.Tensor, stats: ChannelStats) -> None:
    """FLAP bias compensation: ``bias += W[:, removed] @ mean(x[removed])``."""
    if removed.numel() == 0:
        return
    w = weight_matrix(module)
    mean = stats.mean.to(w.device)[removed.to(w.device)]
    delta = w.index_select(1, removed.to(w.device)).double() @ mean.double()
    module.bias.data += delta.to(module.bias.dtype)


def ensure_output_bias(model: nn.Module, spec: ArchSpec, blocks, kind: str) -> bool:
    """Make sure every block's o_proj (``kind='attention'``) or down_proj has a bias; return
    whether compensation can proceed."""
    out_path = spec.o if kind == "attention" else spec.down
    if all(getattr(get_submodule(b, out_path), "bias", None) is not None for b in blocks):
        return True
    flag = spec.attention_bias_attr if kind == "attention" else spec.mlp_bias_attr
    if flag is None or not hasattr(model.config, flag):
        logger.warning(
            "bias_compensation skipped for %s: %s has no bias on %s and its config has no flag that "
            "would make the reloaded model create one.", kind, model.config.model_type, out_path)
        return False
    paths = spec.attention_paths() if kind == "attention" else spec.mlp_paths()
    for block in blocks:
        for path in paths:
            module = get_submodule(block, path)
            if module is not None:
                _add_zero_bias(module)
    setattr(model.config, flag, True)
    logger.info("bias_compensation: set config.%s=True and added zero biases to %s.", flag, ", ".join(paths))
    return True


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
