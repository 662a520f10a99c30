"""Saving pruned models atomically.

Everything is written to a temporary folder beside the output and renamed into place at the
end, so an interrupted run never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

__all__ = ["atomic_output_dir", "check_output_dir", "save_pruned"]


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


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` only if the block finishes without error."""
    final = check_output_dir(path, overwrite).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, backup)
    os.replace(tmp, final)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def save_pruned(model, output_dir, *, tokenizer=None, report=None, overwrite: bool = False,
                extra_files: dict[str, object] | None = None) -> Path:
    """``save_pretrained`` of a pruned model (plus tokenizer and ``pruning_report.json``), atomically.

    The checkpoint has standard parameter names and loads with stock ``from_pretrained``; the
    config carries a ``pruning_config`` entry describing the run.
    """
    with atomic_output_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report.to_json(tmp / "pruning_report.json")
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    logger.info("Saved the pruned model to %s.", output_dir)
    return Path(output_dir)
