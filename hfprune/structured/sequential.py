"""Layer-sequential structured pruning with least-squares compensation (ZipLM / SlimGPT style).

For each decoder block in order, on the calibration activations that the already pruned blocks
produce (the sequential scheme of SparseGPT):

1. run the block up to ``o_proj`` and accumulate the moments of its input
   (:class:`~hfprune.stats.MomentStats`: ``X X^T`` and ``sum x``);
2. choose the heads to remove (the importance: greedy structured OBS, or a Wanda / fluctuation /
   magnitude score) and re-fit the kept ``o_proj`` columns (and its bias, where there is one) by
   least squares (:func:`hfprune.solvers.structured.compensate`); slice q/k/v/o;
3. run the block again, now with the pruned attention, up to ``down_proj``; the same for MLP
   neurons and ``down_proj``;
4. run the pruned block to produce the next block's inputs.

Only the layer runner moves tensors; the math lives in :mod:`hfprune.solvers.structured`.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from hfprune.arch import get_blocks, get_submodule, in_features, weight_matrix
from hfprune.solvers.structured import (augment_bias, compensate, fit_to_target, greedy_remove, output_error,
                                       target_error)
from hfprune.stats import CrossMomentStats, MomentStats
from hfprune.structured.importance import channel_scores, heads_from_channels, magnitude_head_scores, magnitude_neuron_scores
from hfprune.structured.selection import head_units, select_heads, select_neurons
from hfprune.structured.surgery import (add_bias_delta, block_report, block_shapes, complement, head_rows, kv_sq_norms,
                                        mlp_in_weights, q_weight, shrink_block)

logger = logging.getLogger(__name__)

__all__ = ["prune_sequential"]

# Greedy OBS rounds for MLP neurons (SlimGPT's batched greedy): one round per neuron costs ~30 s
# per SmolLM2 block on 2 CPU cores for 461 neurons; 32 rounds remove ~15 at a time.
NEURON_ROUNDS = 32


def _moments(runner, i: int, module: nn.Module) -> MomentStats:
    """Moments of ``module``'s input over all calibration batches of block ``i`` (the block is
    stopped as soon as the module has read its input)."""
    with runner.shared_input_hooks(i, {"m": module}, lambda m: MomentStats(in_features(m)),
                                   stop_when_seen=True) as stats:
        runner.run(i, update=False)
    if "m" not in stats:
        raise RuntimeError(f"Block {i} never called the layer being pruned during calibration; structured "
                           f"pruning with compensation needs it to run.")
    return stats["m"]


class _Last:
    """Holds the last input a hook saw (one calibration batch)."""

    def __init__(self):
        self.x = None

    def add_batch(self, x):
        self.x = x


def _input_of(runner, i: int, module: nn.Module, b: int) -> torch.Tensor:
    """The input ``module`` gets in block ``i`` for calibration batch ``b`` (the block stops there)."""
    with runner.shared_input_hooks(i, {"m": module}, lambda m: _Last(), stop_when_seen=True) as seen:
        runner.run(i, update=False, batches=[b])
    if "m" not in seen:
        raise RuntimeError(f"Block {i} never called the layer being pruned during calibration.")
    return seen["m"].x


def _paired_moments(runner, dense_runner, i: int, module: nn.Module, dense_module: nn.Module) -> CrossMomentStats:
    """Moments of ``module``'s inputs on the pruned model's activations, crossed with the outputs
    the dense model's layer gives on the dense model's activations, batch by batch."""
    acc = CrossMomentStats(in_features(module), weight_matrix(module).shape[0])
    for b in range(runner.num_batches):
        target = dense_module(_input_of(dense_runner, i, dense_module, b))
        acc.add_pair(_input_of(runner, i, module, b), target)
    return acc


def _system(module: nn.Module, stats: MomentStats) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(W, H, has_bias)``: the weights and input Hessian the solver works on; with a bias, the
    bias is the last column of ``W`` and ``H`` is that of ``[X; 1]`` (both divided by ``n``)."""
    W = weight_matrix(module).double()
    H = stats.hessian
    bias = getattr(module, "bias", None)
    if bias is None:
        return W, H.to(W.device), False
    W = torch.cat([W, bias.data.double()[:, None].to(W.device)], dim=1)
    H = augment_bias(stats.xtx, stats.sum, stats.count).to(W.device) / stats.count
    return W, H, True


def _refit(module: nn.Module, keep_cols: torch.Tensor, stats: MomentStats, cfg, entry: dict, key: str) -> None:
    """Re-fit the kept input columns (and bias) of ``module`` in place, before it is sliced;
    records the relative output error on the calibration inputs without and with the re-fit."""
    W, H, has_bias = _system(module, stats)
    n = weight_matrix(module).shape[1]
    keep = keep_cols.to(W.device)
    if has_bias:
        keep = torch.cat([keep, torch.tensor([n], device=W.device)])
    if isinstance(stats, CrossMomentStats):  # fit to the dense model's outputs
        C = stats.xty.to(W.device) / stats.count
        if has_bias:
            C = torch.cat([C, stats.tsum.to(W.device)[None] / stats.count], dim=0)
        energy = stats.tt / stats.count
        H_KK, C_K = H[keep][:, keep], C[keep]
        before = target_error(W[:, keep], H_KK, C_K, energy) / max(energy, 1e-300)
    else:
        ref = float(((W @ H) * W).sum())
        dropped = torch.zeros_like(W)
        dropped[:, keep] = W[:, keep]
        before = output_error(W, dropped, H) / max(ref, 1e-300)
    if cfg.resolved_compensation == "lstsq":
        if isinstance(stats, CrossMomentStats):
            fitted = fit_to_target(W, H, C, keep, damp=cfg.damp)
            after = target_error(fitted, H_KK, C_K, energy) / max(energy, 1e-300)
        else:
            fitted = compensate(W, H, keep, damp=cfg.damp)
            full = torch.zeros_like(W)
            full[:, keep] = fitted
            after = output_error(W, full, H) / max(ref, 1e-300)
        weight = weight_matrix(module)
        weight[:, keep_cols.to(weight.device)] = fitted[:, :len(keep_cols)].to(weight.device, weight.dtype)
        if has_bias:
            module.bias.data.copy_(fitted[:, -1].to(module.bias.dtype))
    else:
        if cfg.bias_compensation and has_bias:
            add_bias_delta(module, complement(keep_cols, n), stats)
        after = before
    entry[f"{key}_error_dropped"] = before
    entry[f"{key}_error"] = after


def _choose_heads(block, spec, cfg, stats: MomentStats, n_heads: int, n_kv: int, hd: int,
                  n_remove: int) -> tuple[torch.Tensor, torch.Tensor]:
    o = get_submodule(block, spec.o)
    if cfg.importance != "obs":
        o_w = weight_matrix(o)
        if cfg.importance == "magnitude":
            scores = magnitude_head_scores(q_weight(block, spec, n_heads, n_kv, hd), o_w, n_heads, hd)
            kv = kv_sq_norms(block, spec, n_heads, n_kv, hd)
        else:
            scores, kv = heads_from_channels(channel_scores(o_w, stats, cfg.importance), n_heads, hd), None
        return select_heads(scores, n_kv, n_remove, cfg.gqa_mode, kv)
    W, H, _ = _system(o, stats)
    group_size = n_heads // n_kv
    kind, _ = head_units(n_heads, n_kv, cfg.gqa_mode)
    heads = torch.arange(n_heads, device=W.device)
    if kind == "slice":  # one query head per KV group and step, at most n_remove per group
        groups = head_rows(heads, hd).view(n_heads, hd)
        removed, _ = greedy_remove(W, H, groups, n_remove * n_kv, damp=cfg.damp, buckets=heads // group_size,
                                   per_bucket=n_remove)
        keep = complement(removed.to(heads.device), n_heads)
        return keep, torch.arange(n_kv)
    groups = head_rows(heads, hd).view(n_kv, group_size * hd)  # whole KV groups (MHA: single heads)
    removed, _ = greedy_remove(W, H, groups, n_remove, damp=cfg.damp)
    keep_kv = complement(removed.to(heads.device), n_kv)
    keep = (keep_kv[:, None] * group_size + torch.arange(group_size, device=keep_kv.device)).reshape(-1)
    return keep, keep_kv


def _choose_neurons(block, spec, cfg, stats: MomentStats, inter: int, n_remove: int) -> torch.Tensor:
    down = get_submodule(block, spec.down)
    if cfg.importance == "obs":
        W, H, _ = _system(down, stats)
        groups = torch.arange(inter, device=W.device)[:, None]
        removed, _ = greedy_remove(W, H, groups, n_remove, damp=cfg.damp, steps=min(n_remove, NEURON_ROUNDS))
        return complement(removed.to(groups.device), inter)
    if cfg.importance == "magnitude":
        scores = magnitude_neuron_scores(mlp_in_weights(block, spec, inter), [weight_matrix(down)])
    else:
        scores = channel_scores(weight_matrix(down), stats, cfg.importance)
    return select_neurons(scores, n_remove)


@torch.no_grad()
def prune_sequential(runner, spec, cfg, head_remove: list[int], mlp_remove: list[int],
                     progress: bool = True, on_block: Callable[[int], None] | None = None,
                     dense_runner=None) -> list[dict]:
    """Prune every block of ``runner.model`` in order (see the module doc); ``runner`` holds the
    captured calibration activations. ``head_remove`` / ``mlp_remove`` are per-block unit counts
    (:meth:`StructuredConfig.head_removal` units). With ``dense_runner`` (a second runner that
    captured the same calibration batches; ``compensation_target="dense"``) the kept columns are
    re-fitted to the outputs of the *dense* model's layer on the dense model's activations, which
    also corrects the drift that the earlier pruned blocks left. Returns the per-block report entries."""
    model = runner.model
    blocks = list(get_blocks(model, spec))
    if dense_runner is not None:
        dense_runner.blocks = list(dense_runner.blocks)  # its block i is swapped for a dense copy below
    entries = []
    for i in tqdm(range(len(blocks)), desc="hfprune structured", disable=not progress, unit="block"):
        block = blocks[i]
        dense = None
        if dense_runner is not None:
            dense = copy.deepcopy(block)
            dense_runner.blocks[i] = dense

        def moments(path):
            if dense is None:
                return _moments(runner, i, get_submodule(block, path))
            return _paired_moments(runner, dense_runner, i, get_submodule(block, path), get_submodule(dense, path))

        shape = n_heads, n_kv, hd, inter = block_shapes(block, spec, model.config)
        entry = {"index": i, "heads_before": n_heads, "kv_heads_before": n_kv, "neurons_before": inter}
        keep_heads, keep_kv, keep = torch.arange(n_heads), torch.arange(n_kv), None
        if head_remove[i] > 0:
            o = get_submodule(block, spec.o)
            stats = moments(spec.o)
            keep_heads, keep_kv = _choose_heads(block, spec, cfg, stats, n_heads, n_kv, hd, head_remove[i])
            keep_heads, keep_kv = keep_heads.cpu(), keep_kv.cpu()
            _refit(o, head_rows(keep_heads, hd), stats, cfg, entry, "o")
            del stats
            shrink_block(block, spec, shape, keep_heads, keep_kv)
        if inter is not None and mlp_remove[i] > 0:
            down = get_submodule(block, spec.down)
            stats = moments(spec.down)
            keep = _choose_neurons(block, spec, cfg, stats, inter, mlp_remove[i]).cpu()
            _refit(down, keep, stats, cfg, entry, "down")
            del stats
            shrink_block(block, spec, shape, keep_neurons=keep)
        entries.append(block_report(entry, shape, keep_heads, keep_kv, keep))
        if i < len(blocks) - 1:
            runner.run(i, update=True)
            if dense_runner is not None:
                dense_runner.run(i, update=True)
        if dense_runner is not None:
            dense_runner.blocks[i] = None  # the dense copy is no longer needed
        if on_block is not None:
            on_block(i)
    return entries
