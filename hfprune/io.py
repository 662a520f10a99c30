"""Saving pruned models atomically.

Everything is written to a temporary folder beside the output and renamed into place at the
end, so an interrupted run (or a full disk) never leaves a half-written checkpoint.

:func:`save_pretrained` (``hfprune.save_pretrained``) is the one entry point: dense
``save_pretrained`` checkpoints, the compressed ``hfprune-sparse`` format (optionally int8/int4)
and the compressed-tensors ``pack-quantized`` export, plus tokenizer, ``pruning_report.json`` and
a model card. :func:`save_pruned` is the older name the CLI uses (dense, card on).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

__all__ = ["atomic_output_dir", "check_output_dir", "save_pretrained", "save_pruned", "FORMATS", "SUPPORTED_DTYPES"]

FORMATS = ("dense", "sparse", "compressed-tensors")
_FORMAT_ALIASES = {"dense": "dense", "sparse": "sparse", "hfprune-sparse": "sparse",
                   "compressed-tensors": "compressed-tensors", "compressed_tensors": "compressed-tensors",
                   "ct": "compressed-tensors"}
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
# format="sparse" on a model without config.pruning_config needs at least this fraction of zeros
# in its decoder Linear weights (below it the bitmask encoding barely pays, see formats.sparse).
_MIN_SPARSITY_WITHOUT_CONFIG = 0.1


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse a non-empty output folder unless ``overwrite``; refuse a file in its place."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"Output path {path} is a file: choose a folder path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output folder {path} is not empty: choose another --output or pass --overwrite (overwrite=True)."
        )
    return path


def _is_disk_full(exc: BaseException | None) -> bool:
    """True for ENOSPC/EDQUOT, also when wrapped (safetensors raises ``SafetensorError('... os error 28')``)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return True
        text = str(exc)
        if "No space left on device" in text or "os error 28" in text or "StorageFull" in text \
                or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _disk_full_error(final: Path, exc: BaseException) -> OSError:
    return OSError(
        errno.ENOSPC,
        f"No space left on device while writing the checkpoint for {final} ({type(exc).__name__}: {exc}). "
        f"Nothing was written there (the partial temporary folder was removed): free space on that disk or "
        f"choose another --output (save directory) on a disk with more room.",
    )


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` only if the block finishes without error.

    On any error the temporary folder (and any parent folders this call created) is removed; a
    full disk is re-raised as an ``OSError(ENOSPC)`` that says what to do.
    """
    final = check_output_dir(path, overwrite).resolve()
    created = []
    parent = final.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except BaseException as exc:
        _remove_empty(created)
        if _is_disk_full(exc):
            raise _disk_full_error(final, exc) from exc
        raise
    try:
        yield tmp
        backup = None
        if final.exists():
            backup = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, backup)
        try:
            os.replace(tmp, final)
        except BaseException:
            if backup is not None:
                os.replace(backup, final)
            raise
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if _is_disk_full(exc) and not (isinstance(exc, OSError) and "--output" in str(exc)):
            raise _disk_full_error(final, exc) from exc
        raise


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------

def _normalize_format(format: str) -> str:
    key = str(format).strip().lower()
    if key not in _FORMAT_ALIASES:
        raise ValueError(f"Unknown format {format!r}: use one of {', '.join(repr(f) for f in FORMATS)}.")
    return _FORMAT_ALIASES[key]


def _check_dtypes(model) -> None:
    import torch

    supported = {torch.float32, torch.float16, torch.bfloat16}
    for name, param in model.named_parameters():
        if param.dtype not in supported:
            raise ValueError(
                f"Parameter {name} has dtype {param.dtype}; hfprune.save_pretrained supports "
                f"{', '.join(SUPPORTED_DTYPES)} weights. Cast the model first (e.g. model.to(torch.bfloat16)), "
                f"or call model.save_pretrained(...) directly for a plain copy."
            )


def _linear_sparsity(model) -> float:
    import torch

    from hfprune.formats.sparse import _compress_targets

    targets = _compress_targets(model)
    zeros = numel = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in targets:
                zeros += int((param == 0).sum())
                numel += param.numel()
    return zeros / numel if numel else 0.0


def _validate(model, fmt: str, bits, group_size) -> None:
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_pretrained expects a transformers PreTrainedModel, got {type(model).__name__}.")
    if bits is not None and (isinstance(bits, bool) or bits not in (4, 8)):
        raise ValueError(f"bits must be None, 4 or 8, got {bits!r}.")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None (one scale per row), got {group_size!r}.")
    if fmt == "dense" and (bits is not None or group_size is not None):
        raise ValueError(
            "format='dense' stores the weights as they are and does not quantize: drop bits/group_size, or use "
            "format='sparse' (compressed sparse + int8/int4) or format='compressed-tensors' (int8/int4 for vLLM)."
        )
    if fmt == "sparse" and group_size is not None and bits is None:
        raise ValueError("group_size needs bits=4 or bits=8 (it is the quantization group); pass bits or drop group_size.")
    if fmt == "compressed-tensors" and bits is None:
        raise ValueError("format='compressed-tensors' writes quantized weights: pass bits=4 or bits=8.")
    _check_dtypes(model)
    if fmt == "compressed-tensors" and group_size is not None:
        from hfprune.formats.sparse import _compress_targets

        targets = _compress_targets(model)
        for name, param in model.named_parameters():
            if name in targets and param.shape[1] % group_size:
                raise ValueError(
                    f"{name} has {param.shape[1]} inputs, not a multiple of group_size={group_size}: choose a "
                    f"group_size that divides every Linear input width, or group_size=None (one scale per channel)."
                )
    if fmt == "sparse" and not isinstance(getattr(model.config, "pruning_config", None), dict):
        sparsity = _linear_sparsity(model)
        if sparsity < _MIN_SPARSITY_WITHOUT_CONFIG:
            raise ValueError(
                f"format='sparse' needs a pruned model, but this one has no config.pruning_config and only "
                f"{100 * sparsity:.1f}% zeros in its decoder Linear weights: prune it first (hfprune.prune(...)) "
                f"or save it with format='dense'."
            )


def _report_dict(report) -> dict | None:
    if report is None:
        return None
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if isinstance(report, dict):
        return report
    raise TypeError(f"report must be a PruneReport or a dict, got {type(report).__name__}.")


def _base_model(model) -> str | None:
    pc = getattr(model.config, "pruning_config", None)
    base = pc.get("base_model") if isinstance(pc, dict) else None
    return str(base or getattr(model.config, "_name_or_path", "") or "") or None


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def save_pretrained(model, save_directory, *, format: str = "dense", bits: int | None = None,
                    group_size: int | None = None, tokenizer=None, report=None,
                    eval_results: dict | None = None, overwrite: bool = False, model_card: bool = True,
                    max_shard_size: int | str = "5GB", command: str | None = None,
                    extra_files: dict[str, Any] | None = None) -> Path:
    """Save a (pruned) model atomically, in one of three formats.

    Args:
        model: a transformers ``PreTrainedModel`` (float32, float16 or bfloat16 weights).
        save_directory: output folder; it must be missing or empty unless ``overwrite``.
        format: ``"dense"`` (stock ``save_pretrained``: zeros stored densely, loads anywhere),
            ``"sparse"`` (compressed ``hfprune-sparse``: kept values + bitmask / N:M index; reloads
            with stock ``from_pretrained`` after ``import hfprune``) or ``"compressed-tensors"``
            (``pack-quantized`` int4/int8, what vLLM reads; needs ``bits``).
        bits: ``None`` (values kept exactly), ``8`` or ``4`` (symmetric, float32 scales);
            ``"sparse"`` and ``"compressed-tensors"`` only.
        group_size: quantization group along the input dimension; ``None`` = one scale per row.
        tokenizer: saved beside the model when given.
        report: a ``PruneReport`` (or its dict) written to ``pruning_report.json`` and summarized
            in the model card.
        eval_results: e.g. ``{"before": {"perplexity": x}, "after": {...}}``; written to
            ``eval_results.json`` and the model card.
        overwrite: replace a non-empty ``save_directory`` (only once the new checkpoint is complete).
        model_card: write ``README.md`` (base model from ``config.pruning_config["base_model"]`` or
            ``config._name_or_path``); skipped for a model with neither a pruning config nor a report.
        max_shard_size: safetensors shard limit (``"5GB"``, ``"500MB"``, bytes).
        command: the command line that produced the model, for the card (default
            ``config.pruning_config["command"]``).
        extra_files: ``{file name: JSON-serializable object}`` written as JSON files.

    Returns:
        The output folder.

    Raises:
        ValueError: unknown format, ``bits`` not in (None, 4, 8), unsupported dtype,
            ``format="sparse"`` on an unpruned model, bad ``group_size``.
        FileExistsError: ``save_directory`` is a file, or a non-empty folder without ``overwrite``.
        OSError: writing failed; a full disk says "No space left on device ... free space or choose
            another --output". Nothing is left behind in either case.
    """
    fmt = _normalize_format(format)
    _validate(model, fmt, bits, group_size)
    report_dict = _report_dict(report)
    check_output_dir(save_directory, overwrite)
    pc = getattr(model.config, "pruning_config", None)
    pc = pc if isinstance(pc, dict) else None

    with atomic_output_dir(save_directory, overwrite) as tmp:
        if fmt == "dense":
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        elif fmt == "sparse":
            from hfprune.formats import save_sparse

            save_sparse(model, tmp, bits=bits, group_size=group_size, max_shard_size=max_shard_size)
        else:
            from hfprune.formats import save_compressed_tensors

            save_compressed_tensors(model, tmp, bits=bits, group_size=group_size, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report_dict is not None:
            (tmp / "pruning_report.json").write_text(json.dumps(report_dict, indent=2, default=str) + "\n",
                                                     encoding="utf-8")
        files = dict(extra_files or {})
        if eval_results is not None:
            files.setdefault("eval_results.json", eval_results)
        for name, obj in files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
        if model_card and (pc is not None or report_dict is not None):
            from hfprune.card import write_model_card

            write_model_card(tmp, base_model=_base_model(model), pruning_config=pc or {}, report=report_dict,
                             eval_results=eval_results, command=command or (pc or {}).get("command"))
        elif model_card:
            logger.info("No config.pruning_config or report: not writing a model card for an unpruned model.")
    logger.info("Saved the model (%s%s) to %s.", fmt, f", int{bits}" if bits else "", save_directory)
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
