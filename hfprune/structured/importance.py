"""Structured importance (pure functions on tensors; higher = more important) and the hooks that gather
the :class:`~hfprune.stats.ChannelStats` they read."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import nn

from hfprune.arch import get_blocks, get_spec, get_submodule, weight_matrix
from hfprune.stats import ChannelStats

logger = logging.getLogger(__name__)


def attach_channel_stats(model: nn.Module) -> tuple[dict[int, dict[str, ChannelStats]], Callable[[], None]]:
    """Hook a :class:`ChannelStats` onto the input of every block's ``o_proj`` and ``down_proj``.

    Returns ``(stats, remove)``: run calibration batches through ``model``, then call ``remove()``
    and pass ``stats`` to :func:`prune_structured`.
    """
    spec = get_spec(model)
    stats: dict[int, dict[str, ChannelStats]] = {}
    handles = []
    for i, block in enumerate(get_blocks(model, spec)):
        stats[i] = {}
        for key, path in (("o", spec.o), ("down", spec.down)):
            module = get_submodule(block, path)
            if module is None:
                continue
            acc = ChannelStats(weight_matrix(module).shape[1])
            stats[i][key] = acc

            def hook(_module, args, acc=acc):
                acc.add_batch(args[0])

            handles.append(module.register_forward_pre_hook(hook))

    def remove() -> None:
        for handle in handles:
            handle.remove()
        handles.clear()

    return stats, remove


# --------------------------------------------------------------------------------------------
# Importance scores (pure functions; higher = more important)
# --------------------------------------------------------------------------------------------


def magnitude_neuron_scores(row_weights: Sequence[torch.Tensor], col_weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Data-free neuron importance: squared group L2 norm of everything that belongs to neuron ``j``.

    ``row_weights`` are ``[n, *]`` matrices whose row ``j`` belongs to the neuron (gate / up),
    ``col_weights`` are ``[*, n]`` matrices whose column ``j`` does (down). The squared norm ranks
    identically to the norm and is additive over groups.
    """
    total = None
    for w in row_weights:
        part = w.detach().double().pow(2).sum(1)
        total = part if total is None else total + part.to(total.device)
    for w in col_weights:
        part = w.detach().double().pow(2).sum(0)
        total = part if total is None else total + part.to(total.device)
    if total is None:
        raise ValueError("magnitude_neuron_scores needs at least one weight matrix.")
    return total


def magnitude_head_scores(q_weight: torch.Tensor, o_weight: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Data-free head importance: squared L2 norm of the head's query rows (``q_weight`` is
    ``[num_heads * head_dim, hidden]``) and output columns (``o_weight`` is
    ``[hidden, num_heads * head_dim]``)."""
    q = q_weight.detach().double().pow(2).sum(1).view(num_heads, head_dim).sum(1)
    o = o_weight.detach().double().pow(2).sum(0).view(num_heads, head_dim).sum(1)
    return q + o.to(q.device)


def channel_scores(out_weight: torch.Tensor, stats: ChannelStats, importance: str = "wanda") -> torch.Tensor:
    """Activation-aware importance of each input channel ``j`` of ``out_weight`` (``[out, in]``).

    * ``"wanda"``: ``||W[:, j]||^2 * sum_t x_tj^2`` (Wanda's ``|W| * ||X||`` squared and summed
      over the channel's column),
    * ``"fluctuation"``: ``||W[:, j]||^2 * var_t(x_tj)`` (FLAP's fluctuation metric).
    """
    col = out_weight.detach().double().pow(2).sum(0)
    if stats.count == 0:
        raise ValueError("ChannelStats saw no tokens; run calibration batches through the model first.")
    if importance == "wanda":
        act = stats.sq_norm
    elif importance == "fluctuation":
        act = stats.var
    else:
        raise ValueError(f"channel_scores supports importance 'wanda' or 'fluctuation', not {importance!r}.")
    return col * act.to(col.device, col.dtype)


def heads_from_channels(scores: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Sum per-channel scores (``[num_heads * head_dim]``) over each head's channels."""
    return scores.reshape(num_heads, head_dim).sum(1)
