"""Saving pruned models atomically: the one save path and the one atomic writer.

Everything is written to a temporary folder (:func:`atomic_output_dir`) or file
(:func:`atomic_write`) beside the output and renamed into place at the end, so an interrupted run
(or a full disk) never leaves a half-written checkpoint. Prune, streaming, recovery and sweep all
write through here.

:func:`save_pretrained` (``hfprune.save_pretrained``) is the one entry point: dense
``save_pretrained`` checkpoints, the compressed ``hfprune-sparse`` format (optionally int8/int4)
and the compressed-tensors ``pack-quantized`` export, plus tokenizer, ``pruning_report.json`` and
a model card. :func:`save_pruned` is the older name the CLI uses (dense, card on).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from hfprune.card import write_model_card
from hfprune.formats import get_format
from hfprune.report import PruneReport

logger = logging.getLogger(__name__)

__all__ = ["atomic_output_dir", "atomic_write", "check_output_dir", "output_lock", "OutputLockedError", "input_paths",
           "save_pretrained", "save_pruned", "write_companions", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


def input_paths(*candidates) -> list[Path]:
    """The candidates that are existing local paths (model folders, calibration files, recipes), resolved."""
    out = []
    for c in candidates:
        if isinstance(c, (str, os.PathLike)) and str(c).strip():
            try:
                path = Path(c).expanduser()
                if path.exists():
                    out.append(path.resolve())
            except (OSError, ValueError):
                continue
    return out


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_dir(path: str | os.PathLike, overwrite: bool = False, inputs=()) -> Path:
    """Refuse an output that would lose data, before any slow work starts.

    * an empty path (``--output ""`` means the current folder);
    * a file in the folder's place;
    * a non-empty folder unless ``overwrite``;
    * even with ``overwrite``: the current folder or one that contains it, the home folder or the
      file system root, and any folder that is or contains one of ``inputs`` (the model being
      pruned, a calibration file, a recipe): replacing it would delete the input.
    """
    if path is None or not str(path).strip():
        raise ValueError("The output path is empty: pass --output NEW_FOLDER (save_directory), a folder that does "
                         "not exist yet or an earlier output to replace with --overwrite.")
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"Output path {path} is a file: choose a folder path.")
    resolved = path.resolve()
    for src in input_paths(*inputs):
        if _is_within(src, resolved):
            what = "is" if src == resolved else "contains"
            raise ValueError(f"Output folder {path} {what} the input {src}: writing there would replace the input. "
                             f"Choose another --output (a new folder).")
    if path.is_dir() and any(not _is_debris(p, resolved.name) for p in path.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"Output folder {path} is not empty: choose another --output or pass --overwrite (overwrite=True)."
            )
        cwd, home = Path.cwd().resolve(), Path.home().resolve()
        if _is_within(cwd, resolved) or _is_within(home, resolved) or resolved == Path(resolved.anchor):
            raise ValueError(f"Output folder {path} is (or contains) the current folder, the home folder or the file "
                             f"system root; --overwrite would replace it. Choose a new folder for --output.")
    _check_writable(resolved)
    return path


def _is_debris(entry: Path, name: str) -> bool:
    """A temporary or old copy that hfprune itself leaves beside (or, for a mount point, inside) an output."""
    return entry.name.startswith((f".{name}.tmp-", f".{name}.old-"))


def _check_writable(resolved: Path) -> None:
    """Fail now, not after hours of pruning, when the output's disk or folder is not writable."""
    place = resolved if resolved.is_dir() and _is_mount_point(resolved) else resolved.parent
    while not place.exists():
        place = place.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hfprune-write-test-", dir=place))
    except OSError as exc:
        raise PermissionError(exc.errno, f"Cannot write the output {resolved}: {place} is not writable "
                                         f"({exc.strerror}). Choose an --output on a writable disk.") from None


class OutputLockedError(RuntimeError):
    """Another process is writing the same output folder."""


_HELD_LOCKS: dict[Path, list] = {}  # lock file -> [fd, depth]: re-entrant within one process


def _lock_path(path: str | os.PathLike) -> Path:
    out = Path(path).expanduser().resolve()
    return out.parent / f".{out.name}.hfprune-lock"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the output ``path`` (a ``.<name>.hfprune-lock`` file beside it).

    A second run to the same output (whose temporary and resume folders would be shared) fails at
    once with :class:`OutputLockedError` instead of mixing its work with the first. Re-entrant in
    one process; the lock file is removed on release (the kernel drops the lock if the process dies).
    """
    import fcntl

    lock = _lock_path(path)
    if lock in _HELD_LOCKS:
        _HELD_LOCKS[lock][1] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[lock][1] -= 1
        return
    created = _make_parents(lock)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            _remove_empty(created)
            raise OutputLockedError(
                f"Another hfprune run (process {holder}) is writing to {Path(path)} (lock {lock}): wait for it to "
                f"finish, or choose another --output.") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed by the previous holder between open and lock: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD_LOCKS[lock] = [fd, 1]
    try:
        yield
    finally:
        del _HELD_LOCKS[lock]
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)
        _remove_empty(created)


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
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False, inputs=()) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` only if the block finishes without error.

    On any error the temporary folder (and any parent folders this call created) is removed; a
    full disk is re-raised as an ``OSError(ENOSPC)`` that says what to do. The output is locked
    (:func:`output_lock`) while the folder is written; ``inputs`` as for :func:`check_output_dir`.
    """
    with output_lock(path):
        with _atomic_output_dir(path, overwrite, inputs) as tmp:
            yield tmp


@contextlib.contextmanager
def _atomic_output_dir(path, overwrite: bool, inputs) -> Iterator[Path]:
    final = check_output_dir(path, overwrite, inputs).resolve()
    created = _make_parents(final)
    _clean_debris(final)
    # A mount point (an empty container volume) cannot be renamed: stage inside it, on its own disk.
    in_place = final.is_dir() and _is_mount_point(final)
    mode = stat.S_IMODE(final.stat().st_mode) if final.is_dir() else _default_dir_mode()
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final if in_place else final.parent))
    except BaseException as exc:
        _remove_empty(created)
        if _is_disk_full(exc):
            raise _disk_full_error(final, exc) from exc
        raise
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkdtemp makes 0700; keep the old folder's mode, else what mkdir would give
        if in_place:
            _replace_contents(tmp, final)
        else:
            _replace_folder(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if _is_disk_full(exc) and not (isinstance(exc, OSError) and "--output" in str(exc)):
            raise _disk_full_error(final, exc) from exc
        raise


def _default_dir_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _is_mount_point(folder: Path) -> bool:
    return os.path.ismount(folder) or folder.stat().st_dev != folder.parent.stat().st_dev


def _replace_folder(tmp: Path, final: Path) -> None:
    """Two renames: the old folder to ``.<name>.old-PID``, the new one into place, then drop the old.
    A run killed between the renames leaves the old copy, which the next run restores (:func:`_clean_debris`)."""
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


def _replace_contents(tmp: Path, final: Path) -> None:
    """Like :func:`_replace_folder` for a folder that cannot be renamed: entry by entry, inside it."""
    backup = final / f".{final.name}.old-{os.getpid()}"
    old = [p for p in final.iterdir() if p != tmp]
    if old:
        backup.mkdir()
        for entry in old:
            os.replace(entry, backup / entry.name)
    for entry in list(tmp.iterdir()):
        os.replace(entry, final / entry.name)
    tmp.rmdir()
    shutil.rmtree(backup, ignore_errors=True)


def _clean_debris(final: Path) -> None:
    """Leftovers of runs killed while writing ``final`` (the caller holds its lock, so no live run owns them):
    temporary folders are removed; an old copy renamed aside is restored if ``final`` is missing, else removed."""
    places = [final.parent] + ([final] if final.is_dir() else [])
    for place in places:
        for tmp in place.glob(glob.escape(f".{final.name}") + ".tmp-*"):
            logger.info("Removing %s, left by an interrupted run.", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    pattern = glob.escape(f".{final.name}") + ".old-*"
    olds = sorted(final.parent.glob(pattern), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists():
        logger.warning("Restoring %s from %s: a run was killed while replacing it.", final, olds[-1])
        os.replace(olds.pop(), final)
    for old in olds + (list(final.glob(pattern)) if final.is_dir() else []):
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Path], Any]) -> None:
    """Write one file through a temporary file beside ``path``, renamed into place when complete
    (``data`` may be a function that writes the given temporary path, e.g. safetensors' ``save_file``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if not callable(data):
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
                fh.flush()
                os.fsync(fh.fileno())
        if callable(data):
            data(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parent folders of ``path``; returns them deepest first (for :func:`_remove_empty`)."""
    created = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break


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
        save_directory: output folder; it must be missing or empty unless ``overwrite``.
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
        overwrite: replace a non-empty ``save_directory`` (only once the new checkpoint is complete).
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
            ``format="sparse"`` on an unpruned model, bad ``group_size``.
        FileExistsError: ``save_directory`` is a file, or a non-empty folder without ``overwrite``.
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
    report_dict = _report_dict(report)
    # the folder the model was loaded from (its weights may still be memory-mapped from there)
    inputs = (getattr(model.config, "_name_or_path", None), record.base_model if record is not None else None, *inputs)
    check_output_dir(save_directory, overwrite, inputs)
    with atomic_output_dir(save_directory, overwrite, inputs) as tmp:
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
