"""Checks run before any pruning work: what the engine cannot do is refused here, with what to do instead.

Each function raises a ``ValueError`` (``TypeError`` for a wrong kind of argument) that names the problem
and the change that fixes it; none of them touches the model.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["check_loaded", "check_prune_request", "check_token_ids", "check_checkpoint_combination"]


def check_loaded(model: nn.Module, what: str = "Pruning") -> None:
    """Refuse a model whose weights were never loaded (built on the ``meta`` device, e.g. under
    ``init_empty_weights()`` or ``from_config`` in ``torch.device("meta")``). Accelerate-offloaded models
    keep meta placeholders too, with hooks that load them: those are fine."""
    from hfprune.core.runner import is_offloaded

    meta = next((n for n, p in model.named_parameters() if p.device.type == "meta"), None)
    if meta is None or is_offloaded(model):
        return
    raise ValueError(
        f"{what} needs the model's weights, but they are not loaded ({meta} is on the meta device): load the model "
        f"with from_pretrained (hfprune.load_model) instead of building it empty; for a checkpoint larger than "
        f"memory, prune it from disk with `hfprune prune --low-memory` "
        f"(hfprune.workflows.streaming.prune_checkpoint).")


def _kind(config) -> str | None:
    """``"structured"``, ``"depth"``, ``"hidden"``, ``"experts"`` (the registered model-level methods that act on
    one block stack) or ``None`` (unstructured / N:M, which prune every stack)."""
    method = getattr(config, "method", None)
    return method if method in _WHAT else None


_WHAT = {"structured": "Structured head/MLP pruning", "depth": "Depth pruning (--method depth)",
         "hidden": "Hidden-size pruning (--method hidden)", "experts": "Expert pruning"}


def check_prune_request(model: nn.Module, config) -> None:
    """Before :func:`hfprune.prune` does any work: the weights are loaded, the layout is known (discovery
    errors surface now) and the method can prune every block stack of this model."""
    from hfprune.arch import get_spec

    check_loaded(model)
    spec = get_spec(model)
    kind = _kind(config)
    if kind is not None and spec.stacks:
        raise ValueError(
            f"{_WHAT[kind]} supports models with one block stack; {type(model).__name__} has two "
            f"({spec.layers} and {', '.join(spec.stacks)}), and pruning one would leave the other as it is. Prune it "
            f"unstructured or N:M (e.g. --method wanda --sparsity 0.5, or --pattern 2:4), which covers both stacks.")
    if kind == "depth":
        check_checkpoint_combination(model.config, "depth")


def check_checkpoint_combination(model_config, operation: str) -> None:
    """Refuse operations that cannot handle what a checkpoint already is, from its config alone (a
    ``PretrainedConfig`` or the ``config.json`` dict), so the CLI can ask before loading any weights.

    ``operation``: ``"depth"`` (remove blocks) or ``"low_memory"`` (``--low-memory`` / ``--resume``: stream
    dense safetensors shards block by block).
    """
    from hfprune.arch.resize import PRUNED_SHAPES_KEY

    get = model_config.get if isinstance(model_config, dict) else lambda k, d=None: getattr(model_config, k, d)
    non_uniform = bool(get(PRUNED_SHAPES_KEY, None))
    quant = get("quantization_config", None) or {}
    quant_method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if operation == "depth" and non_uniform:
        raise ValueError(
            "Depth pruning of a non-uniform structured model (config.pruned_shapes: its blocks have different "
            "widths) is not supported: depth-prune the dense model first (--method depth), then prune heads/MLP "
            "of that output (--target ... --non-uniform), or use uniform structured pruning (no --non-uniform).")
    if operation == "low_memory":
        if non_uniform:
            raise ValueError(
                "--low-memory / --resume rebuild each block from config.json, but this is a non-uniform structured "
                "model (config.pruned_shapes: blocks of different widths): drop --low-memory / --resume and prune it "
                "in memory (hfprune loads it with AutoPrunedModelForCausalLM).")
        if quant_method:
            raise ValueError(
                f"--low-memory / --resume stream dense safetensors shards, but this checkpoint is stored "
                f"{quant_method!r}-compressed: drop --low-memory / --resume and prune it in memory, or save a dense "
                f"copy first (hfprune.save_pretrained(hfprune.load_model(path), out, format='dense')) and stream that.")
        if get("is_encoder_decoder", False):
            raise ValueError("--low-memory / --resume stream decoder-only causal LMs; this checkpoint is an "
                             "encoder-decoder: drop --low-memory / --resume and prune it in memory.")


def check_token_ids(ids: torch.Tensor, model: nn.Module | None, what: str = "Calibration token ids") -> torch.Tensor:
    """``ids`` as a ``long`` tensor, after checking they are integer token ids inside the model's vocabulary
    (a float tensor is not silently cast, an id past the embedding table is not a bare ``IndexError``)."""
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{what} must be integer token ids (a torch.long tensor, e.g. tokenizer(...)['input_ids']), "
                         f"got a {ids.dtype} tensor: tokenize the text, or pass the text itself.")
    ids = ids.long()
    if model is None or ids.numel() == 0:
        return ids
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        raise ValueError(
            f"{type(model).__name__} reads {model.main_input_name!r}, not token ids: pass the calibration as a list "
            f"(or data loader) of model-input dicts, e.g. [{{{model.main_input_name!r}: tensor, ...}}], one per "
            f"batch.")
    vocab = None
    try:
        emb = model.get_input_embeddings()
        vocab = getattr(emb, "num_embeddings", None)
    except (NotImplementedError, AttributeError):
        pass
    if vocab is None:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        vocab = getattr(cfg, "vocab_size", None)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (isinstance(vocab, int) and high >= vocab):
        raise ValueError(f"{what} hold ids from {low} to {high}, but the model's vocabulary has {vocab} entries "
                         f"(ids 0 to {vocab - 1 if isinstance(vocab, int) else '?'}): use the model's own tokenizer.")
    return ids
