"""Saving pruned models atomically: the one save path.

The output policy and the atomic writers live in :mod:`hfprune.fs` (re-exported here:
:func:`atomic_output_dir`, :func:`atomic_write`, :func:`check_output_dir`, :func:`output_lock`, ...):
the checkpoint is written to a temporary folder beside the output, a manifest of its files is
added, and it is renamed into place at the end, so an interrupted run (or a full disk) never
leaves a half-written checkpoint, and ``--overwrite`` / ``hfprune push`` know what hfprune wrote.

:func:`save_pretrained` (``hfprune.save_pretrained``) is the one entry point: dense
``save_pretrained`` checkpoints, the compressed ``hfprune-sparse`` format (optionally int8/int4)
and the compressed-tensors ``pack-quantized`` export, plus tokenizer, ``pruning_report.json`` and
a model card. :func:`save_pruned` is the older name the CLI uses (dense, card on).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hfprune.fs import (MANIFEST, OutputLockedError, atomic_output_dir, atomic_write, check_output_dir,
                        check_output_file, input_paths, output_lock)

from hfprune.card import write_model_card
from hfprune.formats import get_format
from hfprune.report import PruneReport, recount_sparsity

logger = logging.getLogger(__name__)

__all__ = ["atomic_output_dir", "atomic_write", "check_output_dir", "check_output_file", "output_lock",
           "OutputLockedError", "input_paths", "MANIFEST", "save_pretrained", "save_pruned",
           "write_companions", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------

def check_save_args(format: str = "dense", bits=None, group_size=None, model=None):
    """Check the save settings before any slow work: the format exists and ``bits``/``group_size``
    are valid for it and, given ``model``, fit its layers. The CLI calls this before loading the model
    and again before pruning; :func:`save_pretrained` before writing. Returns ``(name, format)``."""
    import torch

    name, fmt = get_format(format)
    _check_bits(bits, group_size)
    if model is None:  # the settings alone: a model without layers, that will be pruned before it is saved
        fmt.validate(torch.nn.Module(), bits, group_size, _TO_BE_PRUNED)
    else:
        fmt.validate(model, bits, group_size, PruneReport.from_model(model) or _TO_BE_PRUNED)
    return name, fmt


_TO_BE_PRUNED = object()  # stands for the record of a model that is pruned before it is saved


def _check_bits(bits, group_size) -> None:
    if bits is not None and (isinstance(bits, bool) or bits not in (4, 8)):
        raise ValueError(f"bits must be None, 4 or 8, got {bits!r}.")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None (one scale per row), got {group_size!r}.")


def _validate(model, fmt, bits, group_size, record) -> None:
    import torch

    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_pretrained expects a transformers PreTrainedModel, got {type(model).__name__}.")
    _check_bits(bits, group_size)
    for name, param in model.named_parameters():
        if param.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"Parameter {name} has dtype {param.dtype}; hfprune.save_pretrained supports "
                f"{', '.join(SUPPORTED_DTYPES)} weights. Cast the model first (e.g. model.to(torch.bfloat16)), "
                f"or call model.save_pretrained(...) directly for a plain copy."
            )
    fmt.validate(model, bits, group_size, record)


def _check_file_name(name) -> None:
    """``extra_files`` keys are plain file names inside the output folder (no folders, no ``..``)."""
    text = str(name)
    if not text or text in (".", "..") or Path(text).name != text or "\\" in text or os.path.isabs(text):
        raise ValueError(f"extra_files name {name!r} is not a plain file name: use a name like 'results.json' "
                         f"(it is written inside the output folder).")


def _report_dict(report) -> dict | None:
    if report is None:
        return None
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if isinstance(report, dict):
        return report
    raise TypeError(f"report must be a PruneReport or a dict, got {type(report).__name__}.")


def write_companions(directory: Path, model, *, tokenizer=None, record=None, report_dict: dict | None = None,
                     eval_results: dict | None = None, extra_files: dict[str, Any] | None = None,
                     model_card: bool = True, command: str | None = None) -> None:
    """Tokenizer, ``pruning_report.json``, JSON extras and the model card beside a checkpoint's weights."""
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    files = dict(extra_files or {})
    if report_dict is not None:
        files = {"pruning_report.json": report_dict, **files}
    if eval_results is not None:
        files.setdefault("eval_results.json", eval_results)
    for name, obj in files.items():
        (directory / name).write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    if model_card and (record is not None or report_dict is not None):
        base = (record.base_model if record else None) or str(getattr(model.config, "_name_or_path", "") or "") or None
        write_model_card(directory, base_model=base, pruning_config=getattr(model.config, "pruning_config", None) or {},
                         report=report_dict, eval_results=eval_results,
                         command=command or (record.command if record else None))
    elif model_card:
        logger.info("No config.pruning_config or report: not writing a model card for an unpruned model.")


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def save_pretrained(model, save_directory, *, format: str = "dense", bits: int | None = None,
                    group_size: int | None = None, tokenizer=None, report=None,
                    eval_results: dict | None = None, overwrite: bool = False, model_card: bool = True,
                    max_shard_size: int | str = "5GB", command: str | None = None,
                    extra_files: dict[str, Any] | None = None, inputs=()) -> Path:
    """Save a (pruned) model atomically, in one of the registered formats (:mod:`hfprune.formats`).

    Args:
        model: a transformers ``PreTrainedModel`` (float32, float16 or bfloat16 weights).
        save_directory: output folder; it must be missing or empty, or with ``overwrite`` an earlier hfprune
            output (see :mod:`hfprune.fs`). The files written are listed in its ``hfprune_manifest.json``
            (what ``hfprune push`` uploads).
        format: ``"dense"`` (stock ``save_pretrained``: zeros stored densely, loads anywhere),
            ``"sparse"`` (compressed ``hfprune-sparse``: kept values + bitmask / N:M index; reloads
            with stock ``from_pretrained`` after ``import hfprune``) or ``"compressed-tensors"``
            (``pack-quantized`` int4/int8, what vLLM reads; needs ``bits``), or a format registered
            with :func:`hfprune.formats.register_format`.
        bits: ``None`` (values kept exactly), ``8`` or ``4`` (symmetric, float32 scales);
            ``"sparse"`` and ``"compressed-tensors"`` only.
        group_size: quantization group along the input dimension; ``None`` = one scale per row.
        tokenizer: saved beside the model when given.
        report: the :class:`~hfprune.report.PruneReport` that :func:`hfprune.prune` returned (or its
            dict): written to ``pruning_report.json``, serialised into ``config.json`` and summarized
            in the model card. Without it, the record a reloaded pruned checkpoint carries is used.
        eval_results: e.g. ``{"before": {"perplexity": x}, "after": {...}}``; written to
            ``eval_results.json`` and the model card.
        overwrite: replace an earlier hfprune output in ``save_directory`` (only once the new checkpoint is
            complete); a folder holding files hfprune did not write is refused.
        model_card: write ``README.md`` (base model from the record or ``config._name_or_path``);
            skipped for a model without a pruning record.
        max_shard_size: safetensors shard limit (``"5GB"``, ``"500MB"``, bytes).
        command: the command line that produced the model, for the card (default: the record's).
        extra_files: ``{file name: JSON-serializable object}`` written as JSON files.
        inputs: further paths the output must never replace (see :func:`check_output_dir`).

    Returns:
        The output folder.

    Raises:
        ValueError: unknown format, ``bits`` not in (None, 4, 8), unsupported dtype,
            ``format="sparse"`` on an unpruned model, bad ``group_size``; ``save_directory`` is a symbolic
            link, or is, holds or lies inside an input.
        FileExistsError: ``save_directory`` is a file, a non-empty folder without ``overwrite``, or a folder
            holding files hfprune did not write.
        OSError: writing failed; a full disk says "No space left on device ... free space or choose
            another --output". Nothing is left behind in either case.
    """
    for extra in extra_files or {}:
        _check_file_name(extra)
    name, fmt = get_format(format)
    if isinstance(report, PruneReport):  # the record travels in config.json (edits made there since win)
        report.save_to(model.config)
    record = PruneReport.from_model(model)  # parsed once; what the format, card and checks go by
    if isinstance(report, PruneReport) and record is not None:
        # The quantization grids are in memory only; a format checks every group against the weights.
        record.quant_scales = report.quant_scales
    _validate(model, fmt, bits, group_size, record)
    # the sparsity the saved weights hold (a merged adapter may have filled the zeros in since pruning)
    report_dict = recount_sparsity(model, record, _report_dict(report))
    # the folder the model was loaded from (its weights may still be memory-mapped from there)
    inputs = (getattr(model.config, "_name_or_path", None), record.base_model if record is not None else None, *inputs)
    check_output_dir(save_directory, overwrite, inputs)
    with atomic_output_dir(save_directory, overwrite, inputs, kind="checkpoint") as tmp:
        fmt.save(model, tmp, record=record, bits=bits, group_size=group_size, max_shard_size=max_shard_size)
        write_companions(tmp, model, tokenizer=tokenizer, record=record, report_dict=report_dict,
                         eval_results=eval_results, extra_files=extra_files, model_card=model_card, command=command)
    logger.info("Saved the model (%s%s) to %s.", name, f", int{bits}" if bits else "", save_directory)
    return Path(save_directory)


def save_pruned(model, output_dir, *, tokenizer=None, report=None, overwrite: bool = False,
                extra_files: dict[str, object] | None = None, format: str = "dense", bits: int | None = None,
                group_size: int | None = None, model_card: bool = True, eval_results: dict | None = None,
                command: str | None = None, max_shard_size: int | str = "5GB") -> Path:
    """``save_pretrained`` of a pruned model (plus tokenizer, ``pruning_report.json`` and model card), atomically.

    Same as :func:`save_pretrained` with ``format="dense"`` by default: the checkpoint has standard
    parameter names and loads with stock ``from_pretrained``; the config carries a
    ``pruning_config`` entry describing the run. An ``"eval_results.json"`` entry of
    ``extra_files`` also goes into the model card.
    """
    extra = dict(extra_files or {})
    if eval_results is None and isinstance(extra.get("eval_results.json"), dict):
        eval_results = extra.pop("eval_results.json")
    return save_pretrained(model, output_dir, format=format, bits=bits, group_size=group_size, tokenizer=tokenizer,
                           report=report, eval_results=eval_results, overwrite=overwrite, model_card=model_card,
                           max_shard_size=max_shard_size, command=command, extra_files=extra)
