"""One-shot pruning: :func:`prune` walks the decoder blocks in order with the layer runner.

For each block: hook its targeted linear layers to accumulate the method's statistics, run the
calibration batches through it, prune every targeted layer, then run the block again so the
next block sees the *pruned* outputs (the sequential scheme of SparseGPT and Wanda).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import get_blocks, get_spec, in_features, find_linears, weight_matrix
from .calibration import get_calibration_ids
from .config import CalibrationConfig, PruningConfig
from .masks import global_budgets, parse_pattern, prune_count
from .registry import get_pruner_cls
from .report import PruneReport, layer_sparsity_report, peak_rss_mb
from .runner import LayerRunner, module_device
from .stats import RowNormStats
from . import scores

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
            if _matches(config.targets, full, rel) and not _matches(config.ignore, full, rel):
                chosen[full] = module
        out.append(chosen)
    if not any(out):
        raise ValueError(
            f"No linear layer matches targets={config.targets} minus ignore={config.ignore}; "
            f"layer names look like {spec.layers}.0.<name>, e.g. {list(find_linears(blocks[0]))[:3]}."
        )
    return out


def _layer_sparsities(config: PruningConfig, targets: list[dict[str, nn.Module]]) -> dict[str, float]:
    """Target sparsity of every pruned layer (uniform unless ``config.layer_sparsity`` is set)."""
    from .allocation import expand_layer_sparsity

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


def _unique_param_sparsity(model: nn.Module) -> float:
    zeros = total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen or p.device.type == "meta":
            continue
        seen.add(id(p))
        zeros += int((p.data == 0).sum().item())
        total += p.numel()
    return zeros / max(1, total)


@torch.no_grad()
def prune(model: nn.Module, tokenizer=None, config: PruningConfig | dict | None = None, calibration: Any = "c4", *,
          nsamples: int | None = None, seqlen: int | None = None, seed: int | None = None,
          batch_size: int | None = None, progress: bool = True) -> PruneReport:
    """Prune ``model`` in place and return a :class:`~hfprune.report.PruneReport`.

    Args:
        model: a transformers causal LM (any architecture in :mod:`hfprune.architectures`).
        tokenizer: its tokenizer (needed for text calibration data).
        config: a method config such as ``WandaConfig(sparsity=0.5, pattern="2:4")``, or a dict
            with a ``method`` key.
        calibration: ``"c4"``, ``"wikitext2"``, ``"self"``, a file path, a Hub data set name, a list
            of strings, a ``[nsamples, seqlen]`` token tensor, or a :class:`CalibrationConfig`.
            Ignored by data-free methods (magnitude).
        nsamples, seqlen, seed, batch_size: override the calibration settings.
        progress: show a progress bar over decoder blocks.

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
    from .structured import StructuredConfig

    if isinstance(config, StructuredConfig):
        return _prune_structured(model, tokenizer, config, calibration, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                 batch_size=batch_size, progress=progress)
    if isinstance(config, dict):
        config = PruningConfig.from_dict(config)
    pruner = get_pruner_cls(config.method)(config)
    spec = get_spec(model)
    blocks = get_blocks(model, spec)
    targets = select_targets(model, config)
    _validate_pattern(config, targets)
    sparsities = _layer_sparsities(config, targets)
    calib = resolve_calibration(calibration, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size)

    was_training = model.training
    model.eval()
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        if pruner.requires_calibration or config.owl:
            ids = get_calibration_ids(calib, tokenizer, model)
            logger.info("Calibrating on %d x %d tokens.", ids.shape[0], ids.shape[1])
            runner = LayerRunner(model, spec, batch_size=_batch_size(calib, ids, model))
            if config.owl or (config.scope == "global" and pruner.requires_calibration):
                sparsities = _allocation_pass(pruner, runner, ids, targets, config, sparsities, progress)
        if pruner.requires_calibration:
            runner.capture(ids)
            scope = "layer" if config.scope == "global" else config.scope
            bar = tqdm(range(len(blocks)), desc=f"hfprune {config.method}", disable=not progress, unit="block")
            for i in bar:
                _prune_block(runner, i, targets[i], pruner, sparsities, scope, config.true_sequential,
                             last=i == len(blocks) - 1)
            runner.release()
        else:
            if config.scope == "global" and not config.owl:
                all_scores = {name: pruner.score(weight_matrix(m), None) for block in targets for name, m in block.items()}
                budgets = global_budgets(all_scores, config.sparsity)
                del all_scores
                sparsities = {name: budgets[name] / weight_matrix(m).numel()
                              for block in targets for name, m in block.items()}
                _warn_full_layers(sparsities)
            scope = "layer" if config.scope == "global" else config.scope
            for block_targets in tqdm(targets, desc=f"hfprune {config.method}", disable=not progress, unit="block"):
                for name, module in block_targets.items():
                    W = weight_matrix(module)
                    result = pruner.prune_weight(W, None, sparsities[name], scope)
                    _apply(W, result.pruned, result.weight)
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.train(was_training)
    elapsed = time.perf_counter() - start

    names = [name for block in targets for name in block]
    layers = layer_sparsity_report(model, names)
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
        calibration=calib.to_dict() if pruner.requires_calibration or config.owl else None,
        layers=layers,
        prune_seconds=elapsed,
        peak_rss_mb=peak_rss_mb(),
        peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        sparsity=zeros / max(1, numel),
        model_sparsity=_unique_param_sparsity(model),
        blocks=block_rows,
    )
    model.config.pruning_config = {
        **config.to_dict(),
        "achieved_sparsity": report.sparsity,
        "layer_sparsity": {n: round(v["sparsity"], 6) for n, v in layers.items()},
        "calibration": report.calibration,
    }
    logger.info("%s", report)
    return report


def _batch_size(calib: CalibrationConfig, ids: torch.Tensor, model: nn.Module) -> int:
    """Calibration windows per block call: the configured value, or (``batch_size=0``, the
    default) as many as fit a memory budget for the block's intermediate activations."""
    if calib.batch_size:
        return calib.batch_size
    cfg = model.config.get_text_config()
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1024)
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 16)
    seqlen = ids.shape[1]
    bytes_per_token = 4 * (6 * hidden + 4 * inter + 2 * heads * seqlen)
    device = module_device(model.get_input_embeddings())
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = 0.25 * free
    else:
        import psutil

        budget = min(4 * 2**30, 0.25 * psutil.virtual_memory().available)
    per_window = bytes_per_token * seqlen
    return int(max(1, min(ids.shape[0], budget // per_window)))


def _prune_block(runner: LayerRunner, i: int, block_targets: dict[str, nn.Module], pruner, sparsities, scope: str,
                 true_sequential: bool, last: bool) -> None:
    """Collect statistics for, prune, and run one decoder block (see the module docstring)."""
    if not block_targets:
        if not last:
            runner.run(i, update=True)
        return

    def make_stats(module):
        return pruner.make_stats(in_features(module), module_device(module))

    def prune_one(name, module, stats):
        W = weight_matrix(module)
        result = pruner.prune_weight(W, stats, sparsities[name], scope)
        _apply(W, result.pruned, result.weight)

    if true_sequential and runner.num_batches == 1:
        # One pass: each layer is pruned right before its first use, from inputs that already
        # went through the pruned layers before it; the block output is the pruned output.
        done = set()

        def on_input(name, module, stats):
            if name not in done:
                prune_one(name, module, stats)
                done.add(name)

        with runner.shared_input_hooks(i, block_targets, make_stats, on_input):
            runner.run(i, update=True)
        _check_called(block_targets, done)
        return

    groups = runner.call_order(i, block_targets) if true_sequential else [list(block_targets)]
    for group in groups:
        members = {name: block_targets[name] for name in group}
        with runner.shared_input_hooks(i, members, make_stats) as stats:
            runner.run(i, update=False, stop_after=members[group[-1]] if true_sequential else None)
        _check_called(members, stats)
        for name in group:
            prune_one(name, members[name], stats[name])
        del stats
    if not last:
        runner.run(i, update=True)


def _check_called(modules: dict[str, nn.Module], seen) -> None:
    missing = sorted(set(modules) - set(seen))
    if missing:
        raise RuntimeError(
            f"Layer(s) {missing} never ran during calibration, so they cannot be pruned with data: "
            f"add them to `ignore`."
        )


def _warn_full_layers(sparsities: dict[str, float]) -> None:
    full = [n for n, s in sparsities.items() if s >= 0.999]
    if full:
        logger.warning("Global scope removes (almost) all weights of %d layer(s), e.g. %s: their scores are on a "
                       "smaller scale than the others'. Consider scope='row' or 'layer'.", len(full), full[0])


def _allocation_pass(pruner, runner: LayerRunner, ids: torch.Tensor, targets, config: PruningConfig,
                     sparsities: dict[str, float], progress: bool) -> dict[str, float]:
    """Per-layer sparsities from a dense pass of Wanda statistics (``|W| * ||X||`` scores):

    * ``scope="global"``: one ranking across all pruned layers (``masks.global_budgets``);
    * ``owl=True``: OWL's per-block sparsities from each block's outlier ratio
      (``allocation.owl_sparsities``), the parameter-weighted mean equal to ``config.sparsity``.
    """
    from . import allocation

    runner.capture(ids)
    blocks = runner.blocks
    norms: dict[str, RowNormStats] = {}
    for i in tqdm(range(len(blocks)), desc="hfprune allocation", disable=not progress, unit="block"):
        if targets[i]:
            with runner.shared_input_hooks(i, targets[i], lambda m: RowNormStats(in_features(m), module_device(m))) as st:
                runner.run(i, update=i < len(blocks) - 1)
            _check_called(targets[i], st)
            norms.update(st)
        elif i < len(blocks) - 1:
            runner.run(i, update=True)
    runner.release()
    modules = {name: m for block in targets for name, m in block.items()}

    def score(name):
        return scores.wanda(weight_matrix(modules[name]), norms[name].norm)

    if config.owl:
        ratios, counts, members = [], [], []
        for block in targets:
            if not block:
                continue
            names = list(block)
            ratios.append(allocation.outlier_ratio([score(n) for n in names], m=config.owl_m))
            counts.append(sum(weight_matrix(block[n]).numel() for n in names))
            members.append(names)
        block_sparsity = allocation.owl_sparsities(ratios, counts, config.sparsity, lam=config.owl_lambda)
        result = dict(sparsities)
        for names, value in zip(members, block_sparsity):
            for n in names:
                result[n] = value
        logger.info("OWL block sparsities: %s", ", ".join(f"{v:.3f}" for v in block_sparsity))
        return result
    budgets = global_budgets({name: score(name).cpu() for name in modules}, config.sparsity)
    result = {name: budgets[name] / weight_matrix(modules[name]).numel() for name in modules}
    _warn_full_layers(result)
    return result


@torch.no_grad()
def _prune_structured(model: nn.Module, tokenizer, config, calibration, *, nsamples=None, seqlen=None, seed=None,
                      batch_size=None, progress=True) -> PruneReport:
    """Structured pruning: channel statistics from one dense calibration pass (when the importance
    or bias compensation needs data), then :func:`hfprune.structured.prune_structured`."""
    import dataclasses

    from .structured import attach_channel_stats, prune_structured

    spec = get_spec(model)
    needs_data = config.importance != "magnitude" or config.bias_compensation
    calib = resolve_calibration(calibration, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    stats = None
    try:
        if needs_data:
            ids = get_calibration_ids(calib, tokenizer, model)
            runner = LayerRunner(model, spec, batch_size=_batch_size(calib, ids, model))
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
    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("num_heads", "num_kv_heads", "intermediate_size")}
    cfg["method"] = f"structured-{config.importance}"
    removed = 1.0 - result["params_after"] / result["params_before"]
    report = PruneReport(
        method=cfg["method"], config=cfg, calibration=calib.to_dict() if needs_data else None, layers={},
        prune_seconds=elapsed, peak_rss_mb=peak_rss_mb(),
        peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        sparsity=removed, model_sparsity=removed,
        blocks=[{"index": i, **{k: v for k, v in b.items() if not isinstance(v, list)}}
                for i, b in enumerate(result["blocks"])],
        structured=result,
    )
    model.config.pruning_config = {**cfg, "params_before": result["params_before"],
                                   "params_after": result["params_after"], "reload_with": result["reload_with"],
                                   "calibration": report.calibration}
    logger.info("Structured pruning removed %.1f%% of the parameters (%d -> %d) in %.1f s.", 100 * removed,
                result["params_before"], result["params_after"], elapsed)
    return report
