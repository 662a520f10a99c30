"""Layer-sequential structured pruning with least-squares compensation (ZipLM / SlimGPT style).

For each decoder block in order, on the calibration activations that the already pruned blocks
produce (the sequential scheme of SparseGPT):

1. run the block up to ``o_proj`` and accumulate the moments of its input
   (:class:`~hfprune.stats.MomentStats`: ``X X^T`` and ``sum x``);
2. choose the heads to remove (the importance: greedy structured OBS, or a Wanda / fluctuation /
   magnitude score) and re-fit the kept ``o_proj`` columns (and its bias, where there is one) by
   least squares (:func:`hfprune.solvers.lstsq.lstsq_fit`); slice q/k/v/o;
3. run the block again, now with the pruned attention, up to ``down_proj``; the same for MLP
   neurons and ``down_proj``;
4. run the pruned block to produce the next block's inputs.

With ``dense_targets`` ``"model"`` (or ``"block"``) the block first runs still dense over the
runner's dense activation stream (or over its own pruned-model input) and records the inputs of
``o_proj`` and ``down_proj`` (:meth:`LayerRunner.record_dense_inputs`, as for the Hessian methods);
the moments are then :class:`~hfprune.stats.CrossStats` and the kept columns are fitted to the
dense layer's outputs ``W X_d`` by the same least-squares solver.

Only the layer runner moves tensors; the math lives in :mod:`hfprune.solvers.structured`.
"""

from __future__ import annotations

import collections
import logging
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from hfprune.arch import get_blocks, get_submodule, in_features, weight_matrix
from hfprune.solvers.lstsq import lstsq_fit, target_error
from hfprune.solvers.structured import augment_bias, greedy_remove
from hfprune.stats import CrossStats, MomentStats
from hfprune.structured.importance import channel_scores, heads_from_channels, magnitude_head_scores, magnitude_neuron_scores
from hfprune.structured.selection import head_units, select_heads, select_neurons
from hfprune.structured.surgery import (add_bias_delta, block_report, block_shapes, complement, head_rows, kv_sq_norms,
                                        mlp_in_weights, q_weight, shrink_block)

logger = logging.getLogger(__name__)

__all__ = ["prune_sequential"]

# Greedy OBS rounds for MLP neurons (SlimGPT's batched greedy): one round per neuron costs ~30 s
# per SmolLM2 block on 2 CPU cores for 461 neurons; 32 rounds remove ~15 at a time.
NEURON_ROUNDS = 32


def _moments(runner, i: int, module: nn.Module, dense_inputs: collections.deque | None = None) -> MomentStats:
    """Moments of ``module``'s input over all calibration batches of block ``i`` (the block is
    stopped as soon as the module has read its input); with ``dense_inputs`` (the dense model's
    inputs of the same calls) crossed with them (:class:`CrossStats`)."""
    if dense_inputs is None:
        make = lambda m: MomentStats(in_features(m))  # noqa: E731
    else:
        make = lambda m: CrossStats(in_features(m), dense_inputs=dense_inputs)  # noqa: E731
    with runner.shared_input_hooks(i, {"m": module}, make, stop_when_seen=True) as stats:
        runner.run(i, update=False)
    if "m" not in stats:
        raise RuntimeError(f"Block {i} never called the layer being pruned during calibration; structured "
                           f"pruning with compensation needs it to run.")
    return stats["m"]


def _system(module: nn.Module, stats) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(W, H, has_bias)``: the weights and input Hessian the solver works on; with a bias, the
    bias is the last column of ``W`` and ``H`` is that of ``[X; 1]`` (both divided by ``n``)."""
    W = weight_matrix(module).double()
    bias = getattr(module, "bias", None)
    if bias is None:
        return W, (stats.xtx / stats.count).to(W.device), False
    W = torch.cat([W, bias.data.double()[:, None].to(W.device)], dim=1)
    H = augment_bias(stats.xtx, stats.sum, stats.count).to(W.device) / stats.count
    return W, H, True


def _cross(stats: CrossStats, has_bias: bool, device) -> torch.Tensor:
    """``G = X X_d^T / n`` (of ``[X; 1]`` and ``[X_d; 1]`` with a bias), float64."""
    G = stats.xtx + stats.diff
    if has_bias:
        return augment_bias(G, stats.sum, stats.count, row_sum=stats.sum + stats.dsum).to(device) / stats.count
    return (G / stats.count).to(device)


def _refit(module: nn.Module, keep_cols: torch.Tensor, stats, cfg, entry: dict, key: str,
           target_energy: float | None = None) -> None:
    """Re-fit the kept input columns (and bias) of ``module`` in place, before it is sliced;
    records the relative output error on the calibration inputs without and with the re-fit (against
    the dense layer's outputs, of energy ``target_energy``, when ``stats`` carries a dense target)."""
    W, H, has_bias = _system(module, stats)
    n = weight_matrix(module).shape[1]
    keep = keep_cols.to(W.device)
    if has_bias:
        keep = torch.cat([keep, torch.tensor([n], device=W.device)])
    G = _cross(stats, has_bias, W.device) if getattr(stats, "has_target", False) else None
    # ||T - W'_K X_K||^2 with T = W X_d: C = G W^T (G = H: the layer's own outputs)
    C = (H if G is None else G) @ W.T
    energy = float(((W @ H) * W).sum()) if target_energy is None or G is None else target_energy / stats.count
    H_KK, C_K = H[keep][:, keep], C[keep]
    before = target_error(W[:, keep], H_KK, C_K, energy) / max(energy, 1e-300)
    if cfg.resolved_compensation == "lstsq":
        fitted = lstsq_fit(W, H, G, keep, dampening=cfg.dampening)
        after = target_error(fitted, H_KK, C_K, energy) / max(energy, 1e-300)
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
        removed, _ = greedy_remove(W, H, groups, n_remove * n_kv, dampening=cfg.dampening, buckets=heads // group_size,
                                   per_bucket=n_remove)
        keep = complement(removed.to(heads.device), n_heads)
        return keep, torch.arange(n_kv)
    groups = head_rows(heads, hd).view(n_kv, group_size * hd)  # whole KV groups (MHA: single heads)
    removed, _ = greedy_remove(W, H, groups, n_remove, dampening=cfg.dampening)
    keep_kv = complement(removed.to(heads.device), n_kv)
    keep = (keep_kv[:, None] * group_size + torch.arange(group_size, device=keep_kv.device)).reshape(-1)
    return keep, keep_kv


def _choose_neurons(block, spec, cfg, stats: MomentStats, inter: int, n_remove: int) -> torch.Tensor:
    down = get_submodule(block, spec.down)
    if cfg.importance == "obs":
        W, H, _ = _system(down, stats)
        groups = torch.arange(inter, device=W.device)[:, None]
        removed, _ = greedy_remove(W, H, groups, n_remove, dampening=cfg.dampening, steps=min(n_remove, NEURON_ROUNDS))
        return complement(removed.to(groups.device), inter)
    if cfg.importance == "magnitude":
        scores = magnitude_neuron_scores(mlp_in_weights(block, spec, inter), [weight_matrix(down)])
    else:
        scores = channel_scores(weight_matrix(down), stats, cfg.importance)
    return select_neurons(scores, n_remove)


def _target_energy(module: nn.Module, inputs) -> float:
    """``||W X_d (+ b)||^2`` summed over the recorded dense inputs of ``module`` (still unpruned)."""
    device = weight_matrix(module).device
    return sum(float(module(x.to(device)).double().pow(2).sum()) for x in inputs)


@torch.no_grad()
def prune_sequential(runner, spec, cfg, head_remove: list[int], mlp_remove: list[int],
                     progress: bool = True, on_block: Callable[[int], None] | None = None) -> list[dict]:
    """Prune every block of ``runner.model`` in order (see the module doc); ``runner`` holds the
    captured calibration activations (and, for ``cfg.dense_targets="model"``, its dense stream:
    :meth:`LayerRunner.start_dense_stream`). ``head_remove`` / ``mlp_remove`` are per-block unit
    counts (:meth:`StructuredConfig.head_removal` units). Returns the per-block report entries."""
    model = runner.model
    blocks = list(get_blocks(model, spec))
    mode = cfg.dense_targets
    entries = []
    for i in tqdm(range(len(blocks)), desc="hfprune structured", disable=not progress, unit="block"):
        block = blocks[i]
        shape = n_heads, n_kv, hd, inter = block_shapes(block, spec, model.config)
        fit = {}
        if head_remove[i] > 0:
            fit["o"] = get_submodule(block, spec.o)
        if inter is not None and mlp_remove[i] > 0:
            fit["down"] = get_submodule(block, spec.down)
        records, energy = {}, {}
        if mode == "model" or (mode == "block" and fit):
            # The block, still dense, runs first and records the inputs of the layers to re-fit: over the
            # dense stream ("model", which this advances) or over its own pruned-model input ("block").
            records = runner.record_dense_inputs(i, fit, own_stream=mode == "block")
            energy = {key: _target_energy(fit[key], records[key]) for key in fit}

        entry = {"index": i, "heads_before": n_heads, "kv_heads_before": n_kv, "neurons_before": inter}
        keep_heads, keep_kv, keep = torch.arange(n_heads), torch.arange(n_kv), None
        if "o" in fit:
            stats = _moments(runner, i, fit["o"], records.get("o"))
            keep_heads, keep_kv = _choose_heads(block, spec, cfg, stats, n_heads, n_kv, hd, head_remove[i])
            keep_heads, keep_kv = keep_heads.cpu(), keep_kv.cpu()
            _refit(fit["o"], head_rows(keep_heads, hd), stats, cfg, entry, "o", energy.get("o"))
            del stats
            shrink_block(block, spec, shape, keep_heads, keep_kv)
        if "down" in fit:
            stats = _moments(runner, i, fit["down"], records.get("down"))
            keep = _choose_neurons(block, spec, cfg, stats, inter, mlp_remove[i]).cpu()
            _refit(fit["down"], keep, stats, cfg, entry, "down", energy.get("down"))
            del stats
            shrink_block(block, spec, shape, keep_neurons=keep)
        del records
        entries.append(block_report(entry, shape, keep_heads, keep_kv, keep))
        if i < len(blocks) - 1:
            runner.run(i, update=True)
        if on_block is not None:
            on_block(i)
    return entries
