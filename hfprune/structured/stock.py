"""Does stock ``from_pretrained`` rebuild this model? Build the model class from its config on the
meta device and compare parameter names, shapes and the simple attributes of every module."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["build_empty", "stock_mismatch", "check_stock_reload"]

_SIMPLE = (int, float, str, bool, type(None))
_IGNORED_ATTRS = {"training", "config", "gradient_checkpointing"}


def build_empty(model: nn.Module, config=None) -> nn.Module:
    """``type(model)`` built from ``config`` (default: ``model.config``) with meta parameters and
    real buffers (so config-derived buffers such as an embedding scale can be read)."""
    from accelerate import init_empty_weights

    config = copy.deepcopy(config if config is not None else model.config)
    for attr in ("pruning_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    with init_empty_weights(include_buffers=False):
        return type(model)._from_config(config, dtype=next(model.parameters()).dtype)


def stock_mismatch(model: nn.Module, limit: int = 5) -> list[str]:
    """Differences between ``model`` and what its config builds (empty: a stock reload gives this model)."""
    empty = build_empty(model)
    problems: list[str] = []
    mine = dict(model.named_parameters(remove_duplicate=False))
    theirs = dict(empty.named_parameters(remove_duplicate=False))
    for name in sorted(set(mine) | set(theirs)):
        if name not in theirs:
            problems.append(f"parameter {name} is not built by the config")
        elif name not in mine:
            problems.append(f"the config builds {name}, which the model does not have")
        elif tuple(mine[name].shape) != tuple(theirs[name].shape):
            problems.append(f"{name}: model {tuple(mine[name].shape)}, config {tuple(theirs[name].shape)}")
    modules = dict(empty.named_modules())
    for name, module in model.named_modules():
        other = modules.get(name)
        if other is None:
            continue
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr in _IGNORED_ATTRS or not isinstance(value, _SIMPLE):
                continue
            if attr in vars(other) and vars(other)[attr] != value:
                problems.append(f"{name or 'model'}.{attr}: model {value!r}, config {vars(other)[attr]!r}")
    return problems[:limit] + ([f"... {len(problems) - limit} more"] if len(problems) > limit else [])


def check_stock_reload(model: nn.Module, what: str) -> None:
    """Raise when the rewritten config would not rebuild ``model`` (before anything is saved)."""
    problems = stock_mismatch(model)
    if problems:
        raise RuntimeError(f"{what}: the rewritten {type(model.config).__name__} does not describe the pruned model, "
                           f"so a stock from_pretrained would load it wrongly: {'; '.join(problems)}. Please report "
                           f"the model type; add the missing per-layer config field to hfprune/arch/resize.py.")


@torch.no_grad()
def derived_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Non-persistent buffers whose value the config determines and that differ from ``model``'s
    (e.g. Gemma-3's embedding scale after a hidden-size change), as the config would build them."""
    empty = build_empty(model)
    theirs = dict(empty.named_buffers())
    out = {}
    for name, buf in model.named_buffers():
        other = theirs.get(name)
        if other is None or other.device.type == "meta" or other.shape != buf.shape:
            continue
        other = other.to(buf.device, buf.dtype)
        if not torch.equal(other, buf):
            out[name] = other
    return out
