"""One-shot pruning: :func:`prune`, the one entry for every registered method and for a list of
them (stages).

Every method is a pruner in :data:`hfprune.registry.METHODS`: a layer-wise pruner
(:class:`~hfprune.methods.base.Pruner`: magnitude, Wanda, SparseGPT, ADMM), run by the per-linear
block loop of :mod:`hfprune.core.layerwise`, or a model-level pruner
(:class:`~hfprune.methods.base.ModelPruner`: heads / MLP neurons, depth, hidden size, experts),
which plans and applies on the whole model. :func:`prune` is the one wrapper around both:
validation before any work, eval mode and ``use_cache``, timing, parameter counts, the report and
``config.pruning_config``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
from torch import nn

from hfprune.config import PruningConfig, config_from_dict
from hfprune.core.checks import check_prune_request
from hfprune.core.calibration import (CPU_BATCH_TOKENS, calibration_batch_size, get_calibration_ids,
                                      resolve_calibration)
from hfprune.core.layerwise import _prune_block, prune_layers
from hfprune.core.stages import check_stages
from hfprune.core.targets import select_targets
from hfprune.registry import get_pruner_cls
from hfprune.report import PruneReport, peak_cuda_mb, peak_rss_mb, reset_peak_cuda

logger = logging.getLogger(__name__)

__all__ = ["prune", "select_targets", "resolve_calibration"]

# Kept importable from here (tests and scripts use these names).
_batch_size = calibration_batch_size
__all__ += ["CPU_BATCH_TOKENS", "_batch_size", "_prune_block"]


def _as_config(config) -> Any:
    if isinstance(config, str):  # a method name: its config with the defaults
        config = {"method": config}
    if isinstance(config, dict):
        return config_from_dict(config)
    if not hasattr(config, "method") or not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config must be a pruning config (e.g. hfprune.WandaConfig(sparsity=0.5)), a dict with a "
                        f"'method' key, or a method name such as 'wanda'; got {type(config).__name__}.")
    return config


@torch.no_grad()
def prune(model: nn.Module, tokenizer=None, config: PruningConfig | dict | list | None = None,
          calibration: Any = "c4", *, nsamples: int | None = None, seqlen: int | None = None,
          seed: int | None = None, batch_size: int | None = None, progress: bool = True,
          session: Any = None) -> PruneReport:
    """Prune ``model`` in place and return a :class:`~hfprune.report.PruneReport`.

    Works on models in memory and on Accelerate-offloaded models (``device_map="auto"`` with
    ``max_memory``/``offload_folder``): the layer runner onloads one block at a time and writes the
    pruned weights back to the offload storage. Under ``accelerate launch``/``torchrun`` (several
    processes) each process calibrates on its share of the windows and the statistics are reduced
    before pruning, with results identical to one process (:mod:`hfprune.core.distributed`).

    Args:
        model: a transformers causal LM (any architecture in :mod:`hfprune.arch`).
        tokenizer: its tokenizer (needed for text calibration data).
        config: a method config such as ``WandaConfig(sparsity=0.5, pattern="2:4")``, a dict with a
            ``method`` key, or a list of them: stages run in order on one calibration set (e.g.
            ``[StructuredConfig(mlp_ratio=0.25), ADMMConfig(pattern="2:4"), SparseGPTConfig(sparsity=0,
            bits=4, group_size=128)]``); the whole list is checked before any work.
        calibration: ``"c4"``, ``"wikitext2"``, ``"self"``, a file path, a Hub data set name, a list
            of strings, a ``[nsamples, seqlen]`` token tensor, or a :class:`CalibrationConfig`.
            Ignored by data-free methods (magnitude).
        nsamples, seqlen, seed, batch_size: override the calibration settings.
        progress: show a progress bar over decoder blocks.
        session: internal (:mod:`hfprune.workflows.streaming`): persists finished blocks and resume state.

    Example:
        >>> import hfprune, torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
        >>> report = hfprune.prune(model, config=hfprune.WandaConfig(pattern="2:4"),
        ...                        calibration=torch.randint(0, 100, (4, 16)), progress=False)
        >>> round(report.sparsity, 3)
        0.5
    """
    if config is None or (isinstance(config, (list, tuple)) and not config):
        raise ValueError("Pass a pruning config, e.g. hfprune.WandaConfig(sparsity=0.5).")
    configs = [_as_config(c) for c in (config if isinstance(config, (list, tuple)) else [config])]
    for c in configs:
        check_prune_request(model, c)  # weights loaded, layout known, method fits the model: before any work
    pruners = [get_pruner_cls(c.method)(c) for c in configs]
    calib = resolve_calibration(calibration, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size)
    if len(pruners) == 1:
        return _run(model, tokenizer, pruners[0], calib, progress=progress, session=session)
    if session is not None:
        raise ValueError("Streaming / resumable pruning (--low-memory, --resume) runs one method: run the stages "
                         "in memory, or one stage per run.")
    check_stages(model, pruners)  # every stage against the shapes the stages before it leave: before any work
    stage_calib = calib
    if any(p.needs_data for p in pruners):  # one calibration set for every stage
        stage_calib = dataclasses.replace(calib, dataset=get_calibration_ids(calib, tokenizer, model))
    reports = []
    for k, pruner in enumerate(pruners):
        logger.info("Stage %d of %d: %s.", k + 1, len(pruners), pruner.report_name)
        report = _run(model, tokenizer, pruner, stage_calib, progress=progress)
        if report.calibration is not None:
            report.calibration = {**report.calibration, "dataset": calib.to_dict()["dataset"]}
        reports.append(report)
    return _staged_report(model, reports)


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _run(model: nn.Module, tokenizer, pruner, calib, *, progress: bool, session: Any = None) -> PruneReport:
    """One method on ``model``: the wrapper every pruner runs in (see the module docstring)."""
    config = pruner.config
    if pruner.model_level:
        if session is not None:
            raise ValueError(f"Streaming / resumable pruning (--low-memory, --resume) writes block shards of "
                             f"the same shapes; {config.method} changes the model's structure: prune in memory.")
        pruner.check(model)  # every refusal before calibration
    was_training = model.training
    model.eval()
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    reset_peak_cuda()  # the report's peak_cuda_mb is this run's (a CPU run creates no CUDA context)
    params_before = _count_params(model) if pruner.model_level else None
    start = time.perf_counter()
    try:
        if pruner.model_level:
            ids = get_calibration_ids(calib, tokenizer, model) if pruner.needs_data else None
            fields = pruner.prune_model(model, ids, calib, progress=progress)
        else:
            fields = prune_layers(model, tokenizer, pruner, calib, progress=progress, session=session)
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.train(was_training)
    elapsed = time.perf_counter() - start
    if pruner.model_level:
        params_after = _count_params(model)
        removed = 1.0 - params_after / params_before
        fields["structured"] = {**fields["structured"], "params_before": params_before, "params_after": params_after}
        fields.setdefault("calibration", calib.to_dict() if pruner.needs_data else None)
        fields.update(sparsity=removed, model_sparsity=removed)
        logger.info("%s removed %.1f%% of the parameters (%d -> %d) in %.1f s.", pruner.report_name, 100 * removed,
                    params_before, params_after, elapsed)
    record = {**config.to_dict(), "method": pruner.report_name}
    report = PruneReport(method=pruner.report_name, config=record, prune_seconds=elapsed, peak_rss_mb=peak_rss_mb(),
                         peak_cuda_mb=peak_cuda_mb(),
                         **{"layers": {}, **fields})
    report.save_to_model(model)  # serialised into config.json; an earlier run's entry is kept under "previous"
    logger.info("%s", report)
    return report


def _staged_report(model: nn.Module, reports: list[PruneReport]) -> PruneReport:
    """One report for a run of several stages: the last stage's record (what the formats read: its
    pattern, grids and layers), the time and memory of all, and every stage under ``stages``."""
    last = reports[-1]
    params = [r.structured for r in reports if r.structured]
    first_params = params[0]["params_before"] if params else None
    report = dataclasses.replace(
        last, method="+".join(r.method for r in reports), prune_seconds=sum(r.prune_seconds for r in reports),
        peak_rss_mb=max(r.peak_rss_mb for r in reports),
        peak_cuda_mb=max((r.peak_cuda_mb for r in reports if r.peak_cuda_mb is not None), default=None),
        pattern=next((r.pattern for r in reversed(reports) if r.pattern != "unstructured"), "unstructured"),
        config={"method": "+".join(r.method for r in reports), "stages": [r.config for r in reports]},
        quant_scales={k: v for r in reports for k, v in r.quant_scales.items()},
        stages=[r.summary() for r in reports])
    if first_params is not None:
        report.structured = {**(last.structured or {}), "params_before": first_params,
                             "params_after": _count_params(model),
                             "reload_with": next(p["reload_with"] for p in reversed(params))}
    # Each stage wrote its entry over the one before ("previous"); the run's entry replaces the chain.
    previous = model.config.pruning_config
    for _ in reports:
        previous = previous.get("previous") if isinstance(previous, dict) else None
    model.config.pruning_config = None
    if previous:
        model.config.pruning_config = previous
    report.save_to_model(model)
    return report
