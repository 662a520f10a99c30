"""Per-layer sparsity budgets measured on the model: ``scope="global"`` (one ranking across every
pruned layer) and OWL (per-block sparsities from outlier ratios), from one dense pass of Wanda
statistics on the runner, or from the weights alone for a data-free method. The arithmetic is in
:mod:`hfprune.core.allocation` and :func:`hfprune.solvers.masks.global_budgets`."""

from __future__ import annotations

import contextlib
import logging

import torch

from hfprune.arch import in_features, weight_matrix
from hfprune.config import PruningConfig
from hfprune.core import allocation
from hfprune.core.distributed import ChunkedStats, finalize_stats
from hfprune.core.runner import LayerRunner, module_device
from hfprune.core.targets import check_called
from hfprune.solvers import scores
from hfprune.solvers.masks import global_budgets
from hfprune.stats import RowNormStats

logger = logging.getLogger(__name__)

__all__ = ["allocation_pass", "data_free_budgets"]


def data_free_budgets(pruner, runner: LayerRunner, targets, sparsity: float, offloaded: bool) -> dict[str, float]:
    """``scope="global"`` for a data-free method: one ranking of its scores across all pruned layers."""
    all_scores, numels = {}, {}
    for i, block_targets in enumerate(targets):
        with runner.onload(i):
            for name, m in block_targets.items():
                score = pruner.score(weight_matrix(m), None)
                all_scores[name] = score.cpu() if offloaded else score
                numels[name] = weight_matrix(m).numel()
    budgets = global_budgets(all_scores, sparsity)
    result = {name: budgets[name] / numels[name] for name in numels}
    _warn_full_layers(result)
    return result


def _warn_full_layers(sparsities: dict[str, float]) -> None:
    full = [n for n, s in sparsities.items() if s >= 0.999]
    if full:
        logger.warning("Global scope removes (almost) all weights of %d layer(s), e.g. %s: their scores are on a "
                       "smaller scale than the others'. Consider scope='row' or 'layer'.", len(full), full[0])


def allocation_pass(pruner, runner: LayerRunner, ids: torch.Tensor, targets, config: PruningConfig,
                     sparsities: dict[str, float], progress: bool, chunking: tuple | None = None) -> dict[str, float]:
    """Per-layer sparsities from a dense pass of Wanda statistics (``|W| * ||X||`` scores):

    * ``scope="global"``: one ranking across all pruned layers (``masks.global_budgets``);
    * ``owl=True``: OWL's per-block sparsities from each block's outlier ratio
      (``allocation.owl_sparsities``), the parameter-weighted mean equal to ``config.sparsity``.
    """

    def make(m):
        if chunking is None:
            return RowNormStats(in_features(m), module_device(m))
        n_chunks, size, ctx = chunking
        return ChunkedStats(lambda: RowNormStats(in_features(m), module_device(m)), runner, n_chunks, size, ctx)

    ratios, counts, members = [], [], []
    all_scores: dict[str, torch.Tensor] = {}
    numels: dict[str, int] = {}

    @contextlib.contextmanager
    def block_scores_of(i):
        # Scores are computed while each block is onloaded (offloaded models have meta weights otherwise).
        with runner.onload(i):
            if not targets[i]:
                yield
                return
            with runner.shared_input_hooks(i, targets[i], make) as st:
                yield
            check_called(targets[i], st)
            norms = finalize_stats(st)
            names = list(targets[i])
            block_scores = {n: scores.wanda(weight_matrix(targets[i][n]), norms[n].norm) for n in names}
            if config.owl:
                ratios.append(allocation.outlier_ratio([block_scores[n] for n in names], m=config.owl_m))
                counts.append(sum(weight_matrix(targets[i][n]).numel() for n in names))
                members.append(names)
            else:
                all_scores.update({n: v.cpu() for n, v in block_scores.items()})
                numels.update({n: weight_matrix(targets[i][n]).numel() for n in names})

    runner.collect(ids, around_block=block_scores_of, desc="hfprune allocation", progress=progress)

    if config.owl:
        block_sparsity = allocation.owl_sparsities(ratios, counts, config.sparsity, lam=config.owl_lambda)
        result = dict(sparsities)
        for names, value in zip(members, block_sparsity):
            for n in names:
                result[n] = value
        logger.info("OWL block sparsities: %s", ", ".join(f"{v:.3f}" for v in block_sparsity))
        return result
    budgets = global_budgets(all_scores, config.sparsity)
    result = {name: budgets[name] / numels[name] for name in numels}
    _warn_full_layers(result)
    return result
