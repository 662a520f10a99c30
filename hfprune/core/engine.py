"""One-shot pruning: :func:`prune` walks the decoder blocks in order with the layer runner.

For each block: hook its targeted linear layers to accumulate the method's statistics, run the
calibration batches through it, prune every targeted layer, then run the block again so the
next block sees the *pruned* outputs (the sequential scheme of SparseGPT and Wanda).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hfprune.arch import moe
from hfprune.arch import check_seqlen, get_blocks, get_spec, in_features, find_linears, weight_matrix
from hfprune.core.calibration import get_calibration_ids
from hfprune.config import CalibrationConfig, PruningConfig
from hfprune.solvers.masks import global_budgets, parse_pattern
from hfprune.registry import get_pruner_cls
from hfprune.core.distributed import ChunkedStats, DistContext, finalize_stats, get_context, shard_windows
from hfprune.report import PruneReport, count_zeros, peak_cuda_mb, peak_rss_mb, reset_peak_cuda, zero_counts
from hfprune.core.runner import LayerRunner, is_offloaded, module_device
from hfprune.stats import RowNormStats
from hfprune.solvers import scores

logger = logging.getLogger(__name__)

__all__ = ["prune", "select_targets", "resolve_calibration"]


def _matches(patterns: list[str], *names: str) -> bool:
    return any(re.fullmatch(p, n) for p in patterns for n in names)


def select_targets(model: nn.Module, config: PruningConfig) -> list[dict[str, nn.Module]]:
    """Per decoder block, the linear layers to prune, keyed by their full module name.

    ``config.targets`` / ``config.ignore`` regexes are matched (fully) against the full name
    (``model.layers.3.mlp.up_proj``) and the name inside the block (``mlp.up_proj``).
    Only layers inside decoder blocks are candidates: embeddings and ``lm_head`` stay dense.
    """
    spec = get_spec(model)
    blocks = get_blocks(model, spec)
    out = []
    for i, block in enumerate(blocks):
        chosen = {}
        for rel, module in find_linears(block).items():
            full = f"{spec.layers}.{i}.{rel}"
            if _is_router(spec, rel) and not _matches([t for t in config.targets if t != ".*"], full, rel):
                continue  # MoE routers stay dense unless a target names them
            if _matches(config.targets, full, rel) and not _matches(config.ignore, full, rel):
                chosen[full] = module
        out.append(chosen)
    if not any(out):
        raise ValueError(
            f"No linear layer matches targets={config.targets} minus ignore={config.ignore}; "
            f"layer names look like {spec.layers}.0.<name>, e.g. {list(find_linears(blocks[0]))[:3]}."
        )
    return out


def _is_router(spec, rel: str) -> bool:
    return any(rel == r or rel.startswith(r + ".") for r in spec.routers)


def _layer_sparsities(config: PruningConfig, targets: list[dict[str, nn.Module]]) -> dict[str, float]:
    """Target sparsity of every pruned layer (uniform unless ``config.layer_sparsity`` is set)."""
    from hfprune.core.allocation import expand_layer_sparsity

    result = {name: config.sparsity for block in targets for name in block}
    if config.layer_sparsity is not None:
        block_of = {name: i for i, block in enumerate(targets) for name in block}
        result.update(expand_layer_sparsity(config.layer_sparsity, list(result), block_of))
    return result


def _validate_pattern(config: PruningConfig, targets: list[dict[str, nn.Module]]) -> None:
    pat = parse_pattern(config.pattern)
    if not pat.is_nm:
        return
    for block in targets:
        for name, module in block.items():
            width = in_features(module)
            if width % pat.m:
                raise ValueError(
                    f"pattern {config.pattern} needs every pruned layer's input width to be a multiple of {pat.m}, "
                    f"but {name} has {width} inputs: choose another M or add it to `ignore`."
                )


def resolve_calibration(calibration: Any = None, **overrides) -> CalibrationConfig:
    """A :class:`CalibrationConfig` from a config, a dict, a source (name/path/list/tensor) or ``None``."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(calibration, CalibrationConfig):
        base = calibration.to_dict()
        base["dataset"] = calibration.dataset
    elif isinstance(calibration, dict):
        base = dict(calibration)
    elif calibration is None:
        base = {}
    else:
        base = {"dataset": calibration}
    base.update(overrides)
    if isinstance(base.get("dataset"), torch.Tensor):
        ids = base["dataset"]
        base.setdefault("nsamples", int(ids.shape[0]) if ids.dim() == 2 else 1)
        base.setdefault("seqlen", int(ids.shape[-1]))
    return CalibrationConfig.from_dict(base)


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


def _check_finite(targets: list[dict[str, nn.Module]]) -> None:
    """NaN or Inf weights would be ranked and saved as if they were numbers: refuse them."""
    for block in targets:
        for name, module in block.items():
            W = weight_matrix(module)
            if W.device.type != "meta" and not bool(torch.isfinite(W).all()):
                bad = int((~torch.isfinite(W)).sum())
                raise ValueError(f"{name} has {bad} NaN/Inf weight(s): the checkpoint is damaged or was saved after a "
                                 f"diverged training step. Fix the weights before pruning, or leave "
                                 f"that layer dense with a regex in ignore= (--ignore).")


def _restore_hidden(runner: LayerRunner, hidden: list[torch.Tensor]) -> None:
    if len(hidden) != runner.num_batches or any(h.shape != r.shape for h, r in zip(hidden, runner.hidden)):
        raise RuntimeError("The saved calibration activations do not match this run's calibration batches: "
                           "resume with the same calibration settings and process count, or drop --resume.")
    runner.hidden = [h.to(r.device, r.dtype) for h, r in zip(hidden, runner.hidden)]


@torch.no_grad()
def prune(model: nn.Module, tokenizer=None, config: PruningConfig | dict | None = None, calibration: Any = "c4", *,
          nsamples: int | None = None, seqlen: int | None = None, seed: int | None = None,
          batch_size: int | None = None, progress: bool = True, session: Any = None) -> PruneReport:
    """Prune ``model`` in place and return a :class:`~hfprune.report.PruneReport`.

    Works on models in memory and on Accelerate-offloaded models (``device_map="auto"`` with
    ``max_memory``/``offload_folder``): the layer runner onloads one block at a time and writes the
    pruned weights back to the offload storage. Under ``accelerate launch``/``torchrun`` (several
    processes) each process calibrates on its share of the windows and the statistics are reduced
    before pruning, with results identical to one process (:mod:`hfprune.core.distributed`); the
    per-layer groups are then always pruned in separate passes (see ``_prune_block``).

    Args:
        model: a transformers causal LM (any architecture in :mod:`hfprune.arch`).
        tokenizer: its tokenizer (needed for text calibration data).
        config: a method config such as ``WandaConfig(sparsity=0.5, pattern="2:4")``, or a dict
            with a ``method`` key.
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
    if config is None:
        raise ValueError("Pass a pruning config, e.g. hfprune.WandaConfig(sparsity=0.5).")
    reset_peak_cuda()  # the report's peak_cuda_mb is this run's, whichever flow runs it
    from hfprune.structured.experts import ExpertPruningConfig, run_expert_pruning

    if isinstance(config, ExpertPruningConfig):  # whole experts removed: its own flow (router-weighted importance)
        return run_expert_pruning(model, tokenizer, config, calibration, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                  progress=progress)
    if isinstance(config, dict):
        config = PruningConfig.from_dict(config)
    from hfprune.structured.depth import DepthPruningConfig, run_depth_pruning
    from hfprune.structured.hidden import HiddenPruningConfig, run_hidden_pruning

    if isinstance(config, (DepthPruningConfig, HiddenPruningConfig)):  # whole blocks / residual channels: own flows
        run = run_depth_pruning if isinstance(config, DepthPruningConfig) else run_hidden_pruning
        return run(model, tokenizer, config, calibration, nsamples=nsamples, seqlen=seqlen, seed=seed,
                   batch_size=batch_size, progress=progress)
    pruner = get_pruner_cls(config.method)(config)
    dense_stream = getattr(pruner, "dense_targets", "off") == "model"
    if pruner.structured:
        return _prune_structured(model, tokenizer, config, calibration, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                 batch_size=batch_size, progress=progress)
    spec = get_spec(model)
    if spec.stacks:
        return _prune_stacks(model, tokenizer, config, calibration, spec, nsamples=nsamples, seqlen=seqlen, seed=seed,
                             batch_size=batch_size, progress=progress, session=session)
    blocks = get_blocks(model, spec)
    # Fused MoE experts are pruned through per-expert [out, in] views (hfprune.arch.moe).
    expert_views = contextlib.ExitStack()
    expert_views.enter_context(moe.linearized(blocks, spec.experts, all_tokens=config.expert_calibration == "all"))
    try:
        targets = select_targets(model, config)
        _validate_pattern(config, targets)
        sparsities = _layer_sparsities(config, targets)
        calib = resolve_calibration(calibration, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size)
        if pruner.requires_calibration or config.owl:
            data = calib.dataset  # token windows are checked; model-input dicts / loaders carry their own shapes
            text = isinstance(data, str) or (isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data))
            width = data.shape[-1] if isinstance(data, torch.Tensor) else calib.seqlen if text else None
            if width is not None:
                check_seqlen(model.config, int(width), "The calibration seqlen (--seqlen)")
        if not is_offloaded(model):  # offloaded blocks are checked as they are onloaded
            _check_finite(targets)
    except BaseException:
        expert_views.close()
        raise

    was_training = model.training
    model.eval()
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    start = time.perf_counter()
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
                _batch_size(calib, ids, model, low_memory=session is not None, one_pass=one_pass))
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
                sparsities = _allocation_pass(pruner, runner, ids, targets, config, sparsities, progress, chunking)
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
            sparsities = _data_free_budgets(pruner, runner, targets, config.sparsity, offloaded)
        scope = "layer" if config.scope == "global" else config.scope
        bar = tqdm(range(first, len(blocks)), desc=f"hfprune {config.method}", disable=not progress, unit="block")
        for i in bar:  # the one block loop: onload, prune (running the block when the method needs data), record
            with runner.onload(i) as handle:
                if offloaded:
                    _check_finite([targets[i]])
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
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.train(was_training)
    elapsed = time.perf_counter() - start

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
    report = PruneReport(
        method=config.method,
        config=config.to_dict(),
        calibration=({**calib.to_dict(), "batch_size": runner.batch_size}
                     if pruner.requires_calibration or config.owl else None),
        layers=layers,
        prune_seconds=elapsed,
        peak_rss_mb=peak_rss_mb(),
        peak_cuda_mb=peak_cuda_mb(),
        sparsity=zeros / max(1, numel),
        model_sparsity=_sparsity_from_counts(runner, counts),
        blocks=block_rows,
        pattern=config.pattern,
        experts=_expert_summary(layers, config),
        quant_scales=grids,
    )
    model.config.pruning_config = report.pruning_config()  # serialised into config.json; nothing reads it back
    logger.info("%s", report)
    return report


# Tokens per block call on CPU when a block takes several passes anyway: small batches keep the
# element-wise work (norms, rotary embeddings, activations) in cache. On SmolLM2-135M (2-core CPU)
# the model body over 64 x 512 tokens took 54-63 s in batches of 2-8 windows (1024-4096 tokens)
# and 75.7 s as one 32768-token batch; `scripts/bench_oneshot.py --runs forward` times the whole
# model at batch 8 and at batch 64.
CPU_BATCH_TOKENS = 2048


def _batch_size(calib: CalibrationConfig, ids: torch.Tensor, model: nn.Module, low_memory: bool = False,
                one_pass: bool = True) -> int:
    """Calibration windows per block call: the configured value, or (``batch_size=0``, the
    default) an automatic choice.

    ``one_pass`` (true-sequential pruning in one process): as many windows as fit a memory
    budget for the block's intermediate activations, so that when all of them fit, each block is
    pruned in a single pass. Otherwise each block is run more than once anyway, and on CPU the
    batch holds about :data:`CPU_BATCH_TOKENS` tokens, which runs faster than one large batch.

    ``low_memory`` (streaming): the budget is the size of the hidden states that are kept
    anyway (``nsamples x seqlen x hidden`` in the model dtype; at least 64 MB), so the block's
    working memory stays about the size of the calibration activations whatever the model width;
    when that splits the windows into several batches, each block takes one pass per
    true-sequential group instead of one pass."""
    if calib.batch_size:
        return calib.batch_size
    if not isinstance(ids, torch.Tensor):
        return 1  # model-input dicts: each one is a batch
    from hfprune.arch.discovery import activation_sizes

    hidden, inter, heads = activation_sizes(model.config)
    seqlen = ids.shape[1]
    bytes_per_token = 4 * (6 * hidden + 4 * inter + 2 * heads * seqlen)
    device = module_device(model.get_input_embeddings())
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = 0.25 * free
    else:
        import psutil

        budget = min(4 * 2**30, 0.25 * psutil.virtual_memory().available)
    if low_memory:
        dtype_bytes = next(model.parameters()).element_size()
        budget = min(budget, max(64 * 2**20, dtype_bytes * hidden * ids.numel()))
    per_window = bytes_per_token * seqlen
    windows = int(max(1, min(ids.shape[0], budget // per_window)))
    if not one_pass and device.type != "cuda":
        windows = min(windows, max(1, CPU_BATCH_TOKENS // seqlen))
    return windows


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
        _check_called(block_targets, done | seen_extra)
        return

    groups = runner.call_order(i, block_targets) if true_sequential else [list(block_targets)]
    for group in groups:
        members = {name: block_targets[name] for name in group}
        members = {n: m for n, m in members.items() if not getattr(m, "data_free", False)}
        with runner.shared_input_hooks(i, members, make_stats, stop_when_seen=True) as stats:
            runner.run(i, update=False)
        prune_unseen(members, stats)
        _check_called(members, set(stats) | seen_extra)
        stats = finalize_stats(stats)
        for name in members:
            if name not in seen_extra:
                prune_one(name, members[name], stats[name])
        del stats
    prune_unseen(block_targets, set(block_targets) - {n for n, m in block_targets.items()
                                                      if getattr(m, "data_free", False)})
    if not last:
        runner.run(i, update=True)


def _prune_stacks(model, tokenizer, config, calibration, spec, *, session=None, **kwargs) -> PruneReport:
    """Prune each block stack in turn (an encoder-decoder: encoder, then decoder from the pruned encoder)."""
    import dataclasses

    if session is not None:
        raise ValueError("Streaming/resumable pruning handles one block stack; encoder-decoders are pruned in memory.")
    model_type = getattr(model.config, "model_type", None)
    saved = model.__dict__.get("_hfprune_spec")
    reports = []
    try:
        for layers in (spec.layers, *spec.stacks):
            model.__dict__["_hfprune_spec"] = (model_type, dataclasses.replace(spec, layers=layers, stacks=()))
            reports.append(prune(model, tokenizer, config, calibration, **kwargs))
    finally:
        if saved is None:
            model.__dict__.pop("_hfprune_spec", None)
        else:
            model.__dict__["_hfprune_spec"] = saved
    first, layers = reports[0], {n: v for r in reports for n, v in r.layers.items()}
    zeros = sum(v["zeros"] for v in layers.values())
    numel = sum(v["numel"] for v in layers.values())
    report = dataclasses.replace(first, layers=layers, prune_seconds=sum(r.prune_seconds for r in reports),
                                 peak_rss_mb=max(r.peak_rss_mb for r in reports), sparsity=zeros / max(1, numel),
                                 peak_cuda_mb=max((r.peak_cuda_mb for r in reports if r.peak_cuda_mb is not None),
                                                  default=None),
                                 model_sparsity=reports[-1].model_sparsity,
                                 blocks=[{**b, "stack": s} for s, r in zip((spec.layers, *spec.stacks), reports)
                                         for b in r.blocks])
    model.config.pruning_config = {**model.config.pruning_config, "achieved_sparsity": report.sparsity,
                                   "layer_sparsity": {n: round(v["sparsity"], 6) for n, v in layers.items()}}
    return report


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
    from hfprune.methods.base import PruneResult
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


def _check_called(modules: dict[str, nn.Module], seen) -> None:
    missing = sorted(set(modules) - set(seen))
    if missing:
        raise RuntimeError(
            f"Layer(s) {missing} never ran during calibration, so they cannot be pruned with data: "
            f"add them to `ignore`."
        )


def _data_free_budgets(pruner, runner: LayerRunner, targets, sparsity: float, offloaded: bool) -> dict[str, float]:
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


def _allocation_pass(pruner, runner: LayerRunner, ids: torch.Tensor, targets, config: PruningConfig,
                     sparsities: dict[str, float], progress: bool, chunking: tuple | None = None) -> dict[str, float]:
    """Per-layer sparsities from a dense pass of Wanda statistics (``|W| * ||X||`` scores):

    * ``scope="global"``: one ranking across all pruned layers (``masks.global_budgets``);
    * ``owl=True``: OWL's per-block sparsities from each block's outlier ratio
      (``allocation.owl_sparsities``), the parameter-weighted mean equal to ``config.sparsity``.
    """
    from hfprune.core import allocation

    runner.capture(ids)
    blocks = runner.blocks

    def make(m):
        if chunking is None:
            return RowNormStats(in_features(m), module_device(m))
        n_chunks, size, ctx = chunking
        return ChunkedStats(lambda: RowNormStats(in_features(m), module_device(m)), runner, n_chunks, size, ctx)

    # Scores are computed while each block is onloaded (offloaded models have meta weights otherwise).
    ratios, counts, members = [], [], []
    all_scores: dict[str, torch.Tensor] = {}
    numels: dict[str, int] = {}
    for i in tqdm(range(len(blocks)), desc="hfprune allocation", disable=not progress, unit="block"):
        with runner.onload(i):
            if targets[i]:
                with runner.shared_input_hooks(i, targets[i], make) as st:
                    runner.run(i, update=i < len(blocks) - 1)
                _check_called(targets[i], st)
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
                del block_scores, norms
            elif i < len(blocks) - 1:
                runner.run(i, update=True)
    runner.release()

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


@torch.no_grad()
def _prune_structured(model: nn.Module, tokenizer, config, calibration, *, nsamples=None, seqlen=None, seed=None,
                      batch_size=None, progress=True) -> PruneReport:
    """Structured pruning: with compensation, block by block (:func:`_prune_structured_sequential`);
    otherwise channel statistics from one dense calibration pass (when the importance or bias
    compensation needs data), then :func:`hfprune.structured.prune_structured`."""
    from hfprune.methods.structured import prune_structured
    from hfprune.structured import attach_channel_stats

    spec = get_spec(model)
    if spec.discovered:
        from hfprune.arch.discovery import check_structured

        check_structured(model, spec, heads=config.heads_ratio > 0, mlp=config.mlp_ratio > 0)
    if is_offloaded(model):
        raise ValueError("Structured pruning changes layer shapes and needs the model in memory: load it without "
                         "offloading (no device_map offload / --low-memory).")
    needs_data = config.importance != "magnitude" or config.bias_compensation or config.sequential
    if config.sequential:
        return _prune_structured_sequential(model, tokenizer, config, calibration, nsamples=nsamples, seqlen=seqlen,
                                            seed=seed, batch_size=batch_size, progress=progress)
    calib = resolve_calibration(calibration, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    stats = None
    try:
        if needs_data:
            ids = get_calibration_ids(calib, tokenizer, model)
            runner = LayerRunner(model, spec, batch_size=_batch_size(calib, ids, model, one_pass=False))
            runner.capture(ids)
            stats, remove = attach_channel_stats(model)
            try:
                for i in tqdm(range(len(runner)), desc="hfprune structured stats", disable=not progress, unit="block"):
                    runner.run(i, update=i < len(runner) - 1)
            finally:
                remove()
                runner.release()
        result = prune_structured(model, heads_ratio=config.heads_ratio, mlp_ratio=config.mlp_ratio,
                                  importance=config.importance, stats=stats, uniform=config.uniform,
                                  gqa_mode=config.gqa_mode, bias_compensation=config.bias_compensation)
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - start
    return _structured_report(model, config, result, calib if needs_data else None, elapsed)


def _structured_report(model: nn.Module, config, result: dict, calib, elapsed: float) -> PruneReport:
    import dataclasses

    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("num_heads", "num_kv_heads", "intermediate_size")}
    cfg["method"] = f"structured-{config.importance}"
    removed = 1.0 - result["params_after"] / result["params_before"]
    report = PruneReport(
        method=cfg["method"], config=cfg, calibration=calib.to_dict() if calib is not None else None, layers={},
        prune_seconds=elapsed, peak_rss_mb=peak_rss_mb(),
        peak_cuda_mb=peak_cuda_mb(),
        sparsity=removed, model_sparsity=removed,
        blocks=[{"index": i, **{k: v for k, v in b.items() if not isinstance(v, list)}}
                for i, b in enumerate(result["blocks"])],
        structured=result,
    )
    model.config.pruning_config = report.pruning_config()
    logger.info("Structured pruning removed %.1f%% of the parameters (%d -> %d) in %.1f s.", 100 * removed,
                result["params_before"], result["params_after"], elapsed)
    return report


@torch.no_grad()
def _prune_structured_sequential(model: nn.Module, tokenizer, config, calibration, *, nsamples=None, seqlen=None,
                                 seed=None, batch_size=None, progress=True) -> PruneReport:
    """Structured pruning block by block with least-squares compensation
    (:mod:`hfprune.structured.sequential`); with ``uniform=False`` the per-block counts come from one
    dense statistics pass first."""
    from hfprune.methods.structured import check_prunable, removal_counts
    from hfprune.structured import attach_channel_stats
    from hfprune.structured.checkpoint import PRUNED_SHAPES_KEY, write_config
    from hfprune.structured.sequential import prune_sequential
    from hfprune.structured.surgery import block_shapes, count_params, ensure_output_bias

    spec = get_spec(model)
    blocks = list(get_blocks(model, spec))
    check_prunable(model, spec, config, [block_shapes(b, spec, model.config) for b in blocks])
    if config.heads_ratio > 0 and config.uniform:
        for b in blocks:  # ratio / GQA grouping problems surface now, before calibration
            n_heads, n_kv, _, _ = block_shapes(b, spec, model.config)
            config.head_removal(n_heads, n_kv, strict=True)
    calib = resolve_calibration(calibration, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size)
    data = calib.dataset
    if isinstance(data, torch.Tensor):
        check_seqlen(model.config, int(data.shape[-1]), "The calibration seqlen (--seqlen)")
    was_training = model.training
    model.eval()
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    start = time.perf_counter()
    params_before = count_params(model)
    try:
        ids = get_calibration_ids(calib, tokenizer, model)
        runner = LayerRunner(model, spec, batch_size=_batch_size(calib, ids, model, one_pass=False))
        stats = None
        if not config.uniform and config.importance != "magnitude":
            runner.capture(ids)
            stats, remove = attach_channel_stats(model)
            try:
                for i in tqdm(range(len(runner)), desc="hfprune structured allocation", disable=not progress,
                              unit="block"):
                    runner.run(i, update=i < len(runner) - 1)
            finally:
                remove()
        head_remove, mlp_remove = removal_counts(model, config, stats)
        del stats
        comp_attn = config.bias_compensation and config.heads_ratio > 0 and \
            ensure_output_bias(model, spec, blocks, "attention")
        comp_mlp = config.bias_compensation and config.mlp_ratio > 0 and ensure_output_bias(model, spec, blocks, "mlp")
        runner.capture(ids)
        dense_runner = None
        if config.compensation_target == "dense":
            dense_runner = LayerRunner(model, spec, batch_size=runner.batch_size)
            dense_runner.capture(ids)
        entries = prune_sequential(runner, spec, config, head_remove, mlp_remove, progress=progress,
                                   dense_runner=dense_runner)
        runner.release()
        if dense_runner is not None:
            dense_runner.release()
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.train(was_training)
    reload_with = write_config(model, spec, blocks)
    if reload_with == "hfprune":
        logger.info("Per-block shapes stored in config.%s; reload with "
                    "hfprune.structured.AutoPrunedModelForCausalLM.from_pretrained.", PRUNED_SHAPES_KEY)
    result = {"importance": config.importance, "uniform": config.uniform, "gqa_mode": config.gqa_mode,
              "heads_ratio": config.heads_ratio, "mlp_ratio": config.mlp_ratio,
              "compensation": config.resolved_compensation,
              "bias_compensation": {"attention": bool(comp_attn), "mlp": bool(comp_mlp)},
              "params_before": params_before, "params_after": count_params(model), "reload_with": reload_with,
              "blocks": entries}
    return _structured_report(model, config, result, calib, time.perf_counter() - start)
