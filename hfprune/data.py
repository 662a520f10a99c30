"""Text sources for calibration and evaluation.

A *source* is one of:

* ``"c4"`` / ``"wikitext2"``: the papers' data sets. They resolve to files in the data
  directory when present (``$HFPRUNE_DATA_DIR``, else ``../shared/data`` beside the project
  checkout or the working directory), otherwise to the Hub data sets;
* a local file: ``.txt``/``.raw`` (one document per line), ``.json``/``.jsonl``, ``.parquet``,
  ``.csv`` (optionally ``.gz``), read through :mod:`datasets` (JSON Lines with the standard library);
* a Hub data set name (with ``config_name``, ``split`` and ``text_column``);
* a list of strings.
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["data_dir", "load_texts", "load_eval_text", "KNOWN_DATASETS"]

# name -> (local file relative to the data dir, split it holds, Hub loader args)
KNOWN_DATASETS = {
    "c4": {
        "file": "c4/c4-train.00000-of-01024.first1000.json.gz",
        "file_split": "train",
        "hub": ("allenai/c4", None, {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}}),
    },
    "wikitext2": {
        "file": "wikitext-2-raw/wiki.test.raw",
        "file_split": "test",
        "hub": ("wikitext", "wikitext-2-raw-v1", {}),
    },
}
_ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "wikitext2": "wikitext2", "c4": "c4"}
_FILE_TYPES = {".txt": "text", ".raw": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def data_dir() -> Path | None:
    """The local data directory, or ``None`` when there is none."""
    env = os.environ.get("HFPRUNE_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"HFPRUNE_DATA_DIR={env} is not a directory: fix or unset it.")
        return path
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data", Path.cwd().parent / "shared" / "data",
                  Path.cwd() / "shared" / "data"]
    for path in candidates:
        if path.is_dir():
            return path
    return None


def _file_kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _FILE_TYPES.get(suffixes[-1]) if suffixes else None


def _looks_like_path(source: str) -> bool:
    # Hub ids look like "name" or "user/name"; anything else with a slash, or a data-file suffix, is a path.
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
            or _file_kind(Path(source)) is not None)


def _read_wikitext_rows(path: Path) -> list[str]:
    """Rows exactly as the Hub's ``wikitext-2-raw-v1`` has them: each line keeps its trailing
    newline and blank lines become ``""``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        lines = fh.read().splitlines(keepends=True)
    return [line if line.strip() else "" for line in lines]


def _read_json_lines(path: Path, text_column: str) -> list[str] | None:
    """The non-empty ``text_column`` values of a JSON Lines file (one object per line, optionally .gz) read
    with the standard library, as :mod:`datasets`' JSON loader gives them; ``None`` for anything else (a
    JSON array, a damaged file), which then goes through :mod:`datasets` and its messages. Importing
    :mod:`datasets` (with pyarrow and pandas) costs a process about 80 MB of RSS, so the common case
    (the c4 calibration file) stays without it."""
    import json

    opener = gzip.open if path.suffix == ".gz" else open
    values, columns = [], {}
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict):
                    return None
                columns.update(dict.fromkeys(row))
                values.append(row.get(text_column))
    except (ValueError, OSError, EOFError):  # not JSON Lines (or unreadable): datasets decides and explains
        return None
    if not values:
        return None
    if text_column not in columns:
        raise ValueError(
            f"{path} has no column {text_column!r} (columns: {list(columns)}); pass text_column=... / --text-column."
        )
    values = [t for t in values if t]
    wrong = next((v for v in values if not isinstance(v, str)), None)
    if wrong is not None:
        raise ValueError(f"Column {text_column!r} of {path} holds {type(wrong).__name__} values (e.g. {wrong!r}), "
                         f"not text: name the text column with --text-column (columns: {list(columns)}).")
    return values


def _load_file(path: Path, text_column: str, split: str | None = None) -> list[str]:
    kind = _file_kind(path)
    if kind is None:
        raise ValueError(
            f"Cannot tell the format of {path}: use a .txt, .json, .jsonl, .parquet or .csv file (optionally .gz)."
        )
    if kind == "text":
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as fh:
                return [line.rstrip("\n") for line in fh if line.strip()]
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}): convert it, e.g. "
                             f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`.") from None
        except (OSError, EOFError) as err:  # a damaged .gz
            raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err}): is the file complete?") from None
    if kind == "json":
        rows = _read_json_lines(path, text_column)
        if rows is not None:
            return rows
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps JSON/CSV/parquet parse errors in its own types
        cause = err.__cause__ or err.__context__ or err
        raise ValueError(f"{path} is not a readable {kind} file ({type(cause).__name__}: {str(cause)[:300]}): fix "
                         f"the file (for JSON Lines, one complete object per line) or pass another --calibration.") from None
    if text_column not in ds.column_names:
        raise ValueError(
            f"{path} has no column {text_column!r} (columns: {ds.column_names}); pass text_column=... / --text-column."
        )
    values = [t for t in ds[text_column] if t]
    wrong = next((v for v in values if not isinstance(v, str)), None)
    if wrong is not None:
        raise ValueError(f"Column {text_column!r} of {path} holds {type(wrong).__name__} values (e.g. {wrong!r}), "
                         f"not text: name the text column with --text-column (columns: {ds.column_names}).")
    return values


def _load_hub(name: str, config_name: str | None, split: str, text_column: str, purpose: str = "calibration",
              **kwargs) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config_name, split=split, **kwargs)
    except Exception as err:  # network errors, missing data sets, offline mode: all mean "not reachable"
        hint = ", or calibrate on text sampled from the model itself with calibration='self' (--calibration self)" \
            if purpose == "calibration" else ""
        raise RuntimeError(
            f"Could not load the data set {name!r} (config {config_name!r}, split {split!r}) from the Hub: "
            f"{type(err).__name__}: {err}. Use a local file, a list of strings, or set HFPRUNE_DATA_DIR to a folder "
            f"with the c4/wikitext files{hint}."
        ) from err
    if text_column not in ds.column_names:
        raise ValueError(f"{name} has no column {text_column!r} (columns: {ds.column_names}); set text_column.")
    return list(ds[text_column])


def _local_split_error(path: Path, split: str, purpose: str) -> ValueError:
    """The local wikitext2 holds only its test split: what to do instead, for what the text is for."""
    if purpose == "evaluation":
        return ValueError(
            f"The local wikitext2 ({path}) holds only the test split, and the {split!r} split is not kept locally: "
            f"evaluate on the test split (--split test, the default), or pass the {split} text as a file "
            f"(--dataset path/to/wiki.{split}.raw).")
    use, flag = ("fine-tune", "--dataset c4") if purpose == "training" else ("calibrate", "--calibration c4")
    return ValueError(
        f"The local wikitext2 ({path}) holds only the test split, which is the text perplexity is measured on: "
        f"{'training' if purpose == 'training' else 'calibrating'} on it makes that number meaningless. "
        f"{use.capitalize()} on c4 ({flag}), or pass split='test' (--split test) to do it knowingly.")


def load_texts(source, *, split: str = "train", text_column: str = "text",
               config_name: str | None = None, purpose: str = "calibration") -> list[str]:
    """Documents of ``source`` as a list of strings (see the module docstring for sources).

    ``purpose`` (``"calibration"``, ``"training"`` or ``"evaluation"``) only words the errors: what the
    text was for and what to pass instead."""
    if isinstance(source, (list, tuple)):
        if not all(isinstance(t, str) for t in source):
            raise ValueError("A calibration list must hold strings; pass token ids as a torch.Tensor instead.")
        return list(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"Unsupported data source of type {type(source).__name__}.")
    source = os.fspath(source)
    key = _ALIASES.get(source.lower())
    if key is not None:
        spec = KNOWN_DATASETS[key]
        root = data_dir()
        if root is not None and (root / spec["file"]).is_file():
            path = root / spec["file"]
            if split != spec["file_split"]:
                if key == "wikitext2":  # the only local split is the evaluation text: no silent leakage
                    raise _local_split_error(path, split, purpose)
                logger.warning("Using %s (the %s split) from %s for split %r: it is the only split kept locally.",
                               key, spec["file_split"], root, split)
            if key == "wikitext2":
                return _read_wikitext_rows(path)
            return _load_file(path, "text")
        name, cfg, kwargs = spec["hub"]
        hub_split = "test" if key == "wikitext2" and split == "test" else split
        return _load_hub(name, cfg, hub_split, "text", purpose, **kwargs)
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            raise ValueError(f"{path} is a directory: pass a data file inside it.")
        return _load_file(path, text_column, split)
    if _looks_like_path(source):
        raise FileNotFoundError(
            f"Data file {source} does not exist: check the path (relative paths start at {Path.cwd()})."
        )
    return _load_hub(source, config_name, split, text_column, purpose)


def load_eval_text(source, *, split: str = "test", text_column: str = "text",
                   config_name: str | None = None) -> str:
    """The evaluation string of the papers' protocol: ``"\\n\\n".join(rows)``."""
    return "\n\n".join(load_texts(source, split=split, text_column=text_column, config_name=config_name,
                                   purpose="evaluation"))
