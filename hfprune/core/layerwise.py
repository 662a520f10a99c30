"""The layer-wise pruner's flow: one loop over the decoder blocks with the layer runner.

For each block: hook its targeted linear layers to accumulate the method's statistics, run the
calibration batches through it, prune every targeted layer, then run the block again so the
next block sees the *pruned* outputs (the sequential scheme of SparseGPT and Wanda).
:func:`hfprune.prune` (:mod:`hfprune.core.engine`) calls :func:`prune_layers` for every method
whose pruner is layer-wise (magnitude, Wanda, SparseGPT, ADMM); it sets eval mode and
``use_cache``, times the run and builds the report from the fields returned here.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hfprune.arch import check_seqlen, get_blocks, get_spec, in_features, moe, weight_matrix
from hfprune.config import CalibrationConfig
from hfprune.core.budgets import allocation_pass, data_free_budgets
from hfprune.core.calibration import calibration_batch_size, get_calibration_ids
from hfprune.core.distributed import ChunkedStats, DistContext, finalize_stats, get_context, shard_windows
from hfprune.core.runner import LayerRunner, is_offloaded, module_device
from hfprune.core.targets import check_called, check_finite, layer_sparsities, select_targets, validate_pattern
from hfprune.report import PruneResult, count_zeros, zero_counts
from hfprune.solvers import scores
from hfprune.solvers.masks import parse_pattern

logger = logging.getLogger(__name__)

__all__ = ["prune_layers"]


def prune_layers(model: nn.Module, tokenizer, pruner, calib: CalibrationConfig, *, progress: bool = True,
                 session: Any = None) -> dict[str, Any]:
    """Prune every targeted linear layer of ``model`` with the layer-wise ``pruner``; returns the
    :class:`~hfprune.report.PruneReport` fields of the run (layers, sparsities, blocks, grids).

    ``session``: internal (:mod:`hfprune.workflows.streaming`): persists finished blocks and resume state.
    """
    config = pruner.config
    dense_stream = getattr(pruner, "dense_targets", "off") == "model"
    spec = get_spec(model)
    if spec.stacks:
        return _prune_stacks(model, tokenizer, pruner, calib, spec, progress=progress, session=session)
    blocks = get_blocks(model, spec)
    # Fused MoE experts are pruned through per-expert [out, in] views (hfprune.arch.moe).
    expert_views = contextlib.ExitStack()
    expert_views.enter_context(moe.linearized(blocks, spec.experts, all_tokens=config.expert_calibration == "all"))
    try:
        targets = select_targets(model, config)
        validate_pattern(config, targets)
        sparsities = layer_sparsities(config, targets)
        if pruner.requires_calibration or config.owl:
            data = calib.dataset  # token windows are checked; model-input dicts / loaders carry their own shapes
            text = isinstance(data, str) or (isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data))
            width = data.shape[-1] if isinstance(data, torch.Tensor) else calib.seqlen if text else None
            if width is not None:
                check_seqlen(model.config, int(width), "The calibration seqlen (--seqlen)")
        if not is_offloaded(model):  # offloaded blocks are checked as they are onloaded
            check_finite(targets)
    except BaseException:
        expert_views.close()
        raise

    runner = LayerRunner(model, spec)
    if session is not None:
        runner.write_path = session.block_path
    resume = session.load() if session is not None else None
    ctx = get_context() if pruner.requires_calibration or config.owl else DistContext()
    offloaded = is_offloaded(model)
    layers: dict[str, dict[str, Any]] = dict(resume["layers"]) if resume else {}
    grids: dict[str, torch.Tensor] = {}  # joint quantization: each layer's grid, for the formats
    counts: dict[int, list[int]] = {int(k): v for k, v in resume["block_counts"].items()} if resume else {}
    first = resume["next_block"] if resume else 0
    if resume:
        sparsities = dict(resume["sparsities"])
        logger.info("Resuming at decoder block %d of %d.", first, len(blocks))
    chunking = None
    try:
        if pruner.requires_calibration or config.owl:
            ids = get_calibration_ids(calib, tokenizer, model)
            logger.info("Calibrating on %d x %d %s.", ids.shape[0], ids.shape[1],
                        "tokens" if isinstance(ids, torch.Tensor) else "input batches")
            one_pass = config.true_sequential and not ctx.enabled
            bs = resume["batch_size"] if resume else ctx.min_int(
                calibration_batch_size(calib, ids, model, low_memory=session is not None, one_pass=one_pass))
            if ctx.enabled and not calib.batch_size and not resume:  # automatic: every process gets a batch
                bs = min(bs, max(1, ids.shape[0] // ctx.world_size))
            windows, batch_ids, n_chunks, chunk_size = shard_windows(ids.shape[0], bs, ctx)
            if ctx.enabled:
                logger.info("Process %d of %d calibrates on %d of %d windows.", ctx.rank, ctx.world_size,
                            len(windows), ids.shape[0])
                ids = ids[windows]
            runner.batch_size = bs
            runner.batch_ids = batch_ids
            chunking = (n_chunks, chunk_size, ctx)
            if session is not None:
                session.batch_size = bs
            if not resume and (config.owl or (config.scope == "global" and pruner.requires_calibration)):
                sparsities = allocation_pass(pruner, runner, ids, targets, config, sparsities, progress, chunking)
        if pruner.requires_calibration:
            runner.capture(ids)
            if dense_stream:
                runner.start_dense_stream()
            if resume and first < len(blocks):
                _restore_hidden(runner, resume["hidden"])
                if dense_stream:
                    runner.dense_hidden = [h.to(r.device, r.dtype) for h, r in
                                           zip(resume.get("dense_hidden") or [], runner.hidden)]
                    if len(runner.dense_hidden) != runner.num_batches:
                        raise RuntimeError("The saved progress has no dense activation stream (dense_targets): "
                                           "resume with the same command, or drop --resume.")
        elif config.scope == "global" and not config.owl and not resume:
            sparsities = data_free_budgets(pruner, runner, targets, config.sparsity, offloaded)
        scope = "layer" if config.scope == "global" else config.scope
        bar = tqdm(range(first, len(blocks)), desc=f"hfprune {config.method}", disable=not progress, unit="block")
        for i in bar:  # the one block loop: onload, prune (running the block when the method needs data), record
            with runner.onload(i) as handle:
                if offloaded:
                    check_finite([targets[i]])
                infos: dict[str, dict] = {}
                _prune_block(runner, i, targets[i], pruner, sparsities, scope, config.true_sequential,
                             last=i == len(blocks) - 1, chunking=chunking, infos=infos, grids=grids)
                _block_report(model, blocks[i], targets[i], i, layers, counts)
                for name, info in infos.items():
                    layers[name].update(info)
                handle.write_back()
            if session is not None:
                session.block_done(i, runner if pruner.requires_calibration else None, sparsities=sparsities,
                                   layers=layers, block_counts=counts)
        runner.release()
    finally:
        expert_views.close()

    names = [name for block in targets for name in block]
    layers = {name: dict(layers[name]) for name in names}
    for name in names:
        layers[name]["target"] = sparsities[name]
    zeros = sum(v["zeros"] for v in layers.values())
    numel = sum(v["numel"] for v in layers.values())
    block_rows = []
    for i, block in enumerate(targets):
        if block:
            z = sum(layers[n]["zeros"] for n in block)
            t = sum(layers[n]["numel"] for n in block)
            block_rows.append({"index": i, "sparsity": z / t, "numel": t})
    return dict(
        calibration=({**calib.to_dict(), "batch_size": runner.batch_size}
                     if pruner.requires_calibration or config.owl else None),
        layers=layers,
        sparsity=zeros / max(1, numel),
        model_sparsity=_sparsity_from_counts(runner, counts),
        blocks=block_rows,
        pattern=config.pattern,
        experts=_expert_summary(layers, config),
        quant_scales=grids,
    )


def _apply(W: torch.Tensor, pruned: torch.Tensor, new_weight: torch.Tensor | None) -> None:
    if new_weight is not None:
        W.copy_(new_weight.to(W.dtype))
    W.masked_fill_(pruned.to(W.device), 0)


def _unique_param_zeros(module: nn.Module) -> tuple[int, int]:
    """(zeros, numel) over the materialised parameters of ``module``, tied tensors counted once."""
    zeros = total = 0
    seen = set()
    for p in module.parameters():
        if id(p) in seen or p.device.type == "meta":
            continue
        seen.add(id(p))
        zeros += count_zeros(p.data)
        total += p.numel()
    return zeros, total


def _block_report(model: nn.Module, block: nn.Module, block_targets: dict[str, nn.Module], i: int,
                  layers: dict, counts: dict) -> None:
    """Per-layer sparsity of block ``i`` and zero counts over all its parameters, while it is onloaded
    (the same rows as :func:`~hfprune.report.layer_sparsity_report`)."""
    layers.update(zero_counts(((n, weight_matrix(m)) for n, m in block_targets.items()), shape=True)["layers"])
    counts[i] = list(_unique_param_zeros(block))


def _sparsity_from_counts(runner: LayerRunner, counts: dict[int, list[int]]) -> float:
    """Whole-model zero fraction from per-block counts plus the parameters outside the blocks
    (onloaded one module at a time when offloaded)."""
    zeros = sum(c[0] for c in counts.values())
    total = sum(c[1] for c in counts.values())
    inside = {id(m) for b in runner.blocks for m in b.modules()}
    seen = set()
    model = runner.model
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(cfg, "tie_word_embeddings", False) and out_emb is not None \
            and out_emb.weight is not model.get_input_embeddings().weight:
        # Offloaded tied weights are separate meta parameters: count the shared matrix once.
        seen.add(id(out_emb.weight))
    for module in runner.model.modules():
        if id(module) in inside:
            continue
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if not params:
            continue
        seen.update(id(p) for p in params)
        with runner.materialize(module):
            for p in module.parameters(recurse=False):
                zeros += count_zeros(p.data)
                total += p.numel()
    return zeros / max(1, total)


def _restore_hidden(runner: LayerRunner, hidden: list[torch.Tensor]) -> None:
    if len(hidden) != runner.num_batches or any(h.shape != r.shape for h, r in zip(hidden, runner.hidden)):
        raise RuntimeError("The saved calibration activations do not match this run's calibration batches: "
                           "resume with the same calibration settings and process count, or drop --resume.")
    runner.hidden = [h.to(r.device, r.dtype) for h, r in zip(hidden, runner.hidden)]



def _prune_block(runner: LayerRunner, i: int, block_targets: dict[str, nn.Module], pruner, sparsities, scope: str,
                 true_sequential: bool, last: bool, chunking: tuple | None = None,
                 infos: dict | None = None, grids: dict | None = None) -> None:
    """Collect statistics for, prune, and run one decoder block (see the module docstring).

    ``infos`` receives each layer's :attr:`PruneResult.info` (e.g. SparseGPT's output error),
    ``grids`` its :attr:`PruneResult.scale` (the quantization grid of joint quantization).

    ``chunking = (n_chunks, batches_per_chunk, DistContext)`` sums statistics per chunk of
    calibration batches in a fixed order (and reduces them across processes), see
    :mod:`hfprune.core.distributed`. With several processes the true-sequential groups are always
    pruned in separate passes (statistics must be reduced before each group is pruned), never in
    the one-pass mode.
    """
    if not pruner.requires_calibration:  # data-free: nothing to run
        for name, module in block_targets.items():
            W = weight_matrix(module)
            result = pruner.prune_weight(W, None, sparsities[name], scope)
            _apply(W, result.pruned, result.weight)
            if infos is not None and result.info:
                infos[name] = result.info
        return
    dense_inputs: dict[int, Any] = {}
    mode = getattr(pruner, "dense_targets", "off")
    fit = {} if mode == "off" else {
        n: m for n, m in block_targets.items()
        if not (getattr(m, "data_free", False) or isinstance(m, moe.ExpertLinear) or _is_expert(runner.spec, n))}
    if mode == "model" or (mode == "block" and fit and true_sequential):
        # Dense targets: the block, still dense, runs first and records its layers' inputs. "model": over
        # the dense model's own activation stream (advanced here); "block": over this block's pruned-model
        # inputs, so each layer is fit to the dense block's output and the correction stays within the block
        # (without true_sequential every layer already sees the dense block's inputs: nothing to correct).
        records = runner.record_dense_inputs(i, fit, own_stream=mode == "block")
        dense_inputs = {id(fit[n]): q for n, q in records.items()}
    if not block_targets:
        if not last:
            runner.run(i, update=True)
        return
    ctx = chunking[2] if chunking is not None else DistContext()

    def plain_stats(module):
        if id(module) in dense_inputs:
            return pruner.make_stats(in_features(module), module_device(module), dense_inputs=dense_inputs[id(module)])
        return pruner.make_stats(in_features(module), module_device(module))

    def make_stats(module):
        if chunking is None:
            return plain_stats(module)
        n_chunks, size, _ = chunking
        return ChunkedStats(lambda: plain_stats(module), runner, n_chunks, size, ctx)

    def prune_one(name, module, stats):
        W = weight_matrix(module)
        tokens = _stat_tokens(stats)
        if stats is None or tokens == 0:
            # An expert the router sent no calibration token to (or one without statistics).
            result = _data_free_result(pruner, W, sparsities[name], scope)
        else:
            result = pruner.prune_weight(W, stats, sparsities[name], scope)
        _apply(W, result.pruned, result.weight)
        if grids is not None and result.scale is not None:
            grids[name] = result.scale.detach().cpu()
        info = dict(result.info or {})
        if (isinstance(module, moe.ExpertLinear) or _is_expert(runner.spec, name)) and \
                (stats is None or tokens is not None):
            info["tokens"] = tokens or 0
        if stats is None or tokens == 0:
            info["statistics"] = "none (magnitude)"
        if infos is not None and info:
            infos[name] = info

    def prune_unseen(members, seen):
        """Layers without calibration statistics are pruned by magnitude: data-free experts, experts
        the router never called, and layers the calibration input never reaches (the cross-attention
        of a decoder run without encoder states, weights a block reads without calling the layer)."""
        unseen = [n for n in members if n not in seen and n not in seen_extra]
        quiet = [n for n in unseen if getattr(members[n], "data_free", False) or _is_expert(runner.spec, n)]
        loud = [n for n in unseen if n not in quiet]
        if loud:
            logger.warning("Layer(s) %s never ran during calibration; they are pruned by magnitude. Add them to "
                           "`ignore` to keep them dense.", loud)
        for name in unseen:
            prune_one(name, members[name], None)
            seen_extra.add(name)

    seen_extra: set[str] = set()

    if true_sequential and runner.num_batches == 1 and not ctx.enabled:
        # One pass: each layer is pruned right before its first use, from inputs that already
        # went through the pruned layers before it; the block output is the pruned output.
        # (One batch: the plain sum equals the chunked one.)
        done = set()

        def on_input(name, module, stats):
            if name not in done:
                prune_one(name, module, stats)
                done.add(name)

        with runner.shared_input_hooks(i, block_targets, plain_stats, on_input):
            runner.run(i, update=True)
        prune_unseen(block_targets, done)
        check_called(block_targets, done | seen_extra)
        return

    groups = runner.call_order(i, block_targets) if true_sequential else [list(block_targets)]
    for group in groups:
        members = {name: block_targets[name] for name in group}
        members = {n: m for n, m in members.items() if not getattr(m, "data_free", False)}
        with runner.shared_input_hooks(i, members, make_stats, stop_when_seen=True) as stats:
            runner.run(i, update=False)
        prune_unseen(members, stats)
        check_called(members, set(stats) | seen_extra)
        stats = finalize_stats(stats)
        for name in members:
            if name not in seen_extra:
                prune_one(name, members[name], stats[name])
        del stats
    prune_unseen(block_targets, set(block_targets) - {n for n, m in block_targets.items()
                                                      if getattr(m, "data_free", False)})
    if not last:
        runner.run(i, update=True)


def _prune_stacks(model, tokenizer, pruner, calib, spec, *, session=None, progress=True) -> dict[str, Any]:
    """Prune each block stack in turn (an encoder-decoder: encoder, then decoder from the pruned encoder)."""
    import dataclasses

    if session is not None:
        raise ValueError("Streaming/resumable pruning handles one block stack; encoder-decoders are pruned in memory.")
    model_type = getattr(model.config, "model_type", None)
    saved = model.__dict__.get("_hfprune_spec")
    runs = []
    try:
        for layers in (spec.layers, *spec.stacks):
            model.__dict__["_hfprune_spec"] = (model_type, dataclasses.replace(spec, layers=layers, stacks=()))
            runs.append(prune_layers(model, tokenizer, pruner, calib, progress=progress))
    finally:
        if saved is None:
            model.__dict__.pop("_hfprune_spec", None)
        else:
            model.__dict__["_hfprune_spec"] = saved
    layers = {n: v for r in runs for n, v in r["layers"].items()}
    zeros = sum(v["zeros"] for v in layers.values())
    numel = sum(v["numel"] for v in layers.values())
    return {**runs[0], "layers": layers, "sparsity": zeros / max(1, numel), "model_sparsity": runs[-1]["model_sparsity"],
            "blocks": [{**b, "stack": s} for s, r in zip((spec.layers, *spec.stacks), runs) for b in r["blocks"]],
            "quant_scales": {k: v for r in runs for k, v in r["quant_scales"].items()}}


def _stat_tokens(stats) -> int | None:
    """Calibration tokens a statistics accumulator saw (``None`` when it does not count them)."""
    for attr in ("tokens", "count"):
        value = getattr(stats, attr, None)
        if isinstance(value, int):
            return value
    return None


def _is_expert(spec, name: str) -> bool:
    """True when the full layer name lies inside one of the block's expert containers."""
    return any(f".{c}." in f".{name}." for c in spec.experts)


def _data_free_result(pruner, W: torch.Tensor, sparsity: float, scope: str):
    from hfprune.solvers.masks import select_mask

    return PruneResult(pruned=select_mask(scores.magnitude(W), sparsity, parse_pattern(pruner.config.pattern), scope))


def _expert_summary(layers: dict[str, dict], config: PruningConfig) -> dict | None:
    """Calibration tokens per expert weight and the experts with too few (see ``min_expert_tokens``)."""
    rows = {n: v for n, v in layers.items() if "tokens" in v}
    if not rows:
        return None
    few = []
    for name, v in rows.items():
        need = config.min_expert_tokens if config.min_expert_tokens is not None else v["shape"][1]
        if v["tokens"] < need:
            few.append(name)
    if few:
        logger.warning("%d of %d expert weights saw fewer calibration tokens than %s (e.g. %s: %d tokens); their "
                       "statistics are poor. Use more calibration data or expert_calibration='all'.", len(few),
                       len(rows), config.min_expert_tokens or "their input width", few[0], rows[few[0]]["tokens"])
    return {"calibration": config.expert_calibration, "tokens": {n: v["tokens"] for n, v in rows.items()},
            "few_tokens": few}


