"""Module helpers every part of hfprune uses: which modules are prunable linear layers, their weight
as an ``[out_features, in_features]`` view, a submodule by its dotted path, and the size attributes
modules read at forward time. A leaf: imports nothing from hfprune."""

from __future__ import annotations

import torch
from torch import nn

try:  # GPT-2 style "Conv1D" is a linear layer with a transposed weight ([in, out]).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always has it today
    Conv1D = ()

__all__ = ["Conv1D", "is_linear", "weight_matrix", "in_features", "get_submodule", "set_attention_sizes",
           "set_mlp_size"]


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


def is_linear(module: nn.Module) -> bool:
    """True for the layer types hfprune prunes: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as an ``[out_features, in_features]`` tensor that shares storage with the
    parameter (a transposed view for GPT-2's ``Conv1D``), so in-place writes reach the model."""
    weight = module.weight.data
    if bool(Conv1D) and isinstance(module, Conv1D):
        return weight.t()
    return weight


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]


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
