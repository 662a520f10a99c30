"""Local copies of the zero-shot evaluation splits, read into the Hub data sets' schemas.

The task configs in ``hfprune/eval/tasks/*.yaml`` are lm-evaluation-harness configs with the stock
prompts and metrics; instead of a Hub ``dataset_path`` they name ``custom_dataset:
!function _local_data.load`` and, under ``dataset_kwargs``, the file(s) of the split relative to the
task data folder and a ``reader``. The harness calls ``load(**metadata, **dataset_kwargs)``; the
reader turns the file into the fields the Hub data set has (e.g. ARC's ``question.stem`` becomes
``question``), so the harness's own ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` apply
unchanged.

The task data folder is ``$HFPRUNE_DATA_DIR/tasks`` (else ``../shared/data/tasks``, found like the
calibration data, see :func:`hfprune.data.data_dir`); ``$HFPRUNE_TASK_DATA_DIR`` overrides it.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from hfprune.data import data_dir

__all__ = ["task_data_dir", "resolve_data_file", "load", "READERS", "MissingTaskDataError"]

_ENV = "HFPRUNE_TASK_DATA_DIR"


class MissingTaskDataError(FileNotFoundError):
    """A task's data file is not in the task data folder."""


def task_data_dir(required: bool = True) -> Path | None:
    """The folder holding the task data (``<data dir>/tasks``); ``None`` when there is none and not ``required``."""
    env = os.environ.get(_ENV)
    if env:
        return Path(env).expanduser()
    root = data_dir()
    if root is None:
        if not required:
            return None
        raise MissingTaskDataError(
            "No task data folder: set HFPRUNE_DATA_DIR to the data folder whose tasks/ subfolder holds the "
            "evaluation splits (or HFPRUNE_TASK_DATA_DIR to that tasks/ folder itself); by default it is "
            "../shared/data/tasks beside the project checkout or the working directory.")
    return root / "tasks"


def resolve_data_file(relative: str, task: str = "?", root: Path | None = None) -> Path:
    """``<task data dir>/<relative>``, or a :class:`MissingTaskDataError` naming the file and where it goes."""
    root = task_data_dir() if root is None else root
    path = Path(relative).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise MissingTaskDataError(
            f"Task {task!r} needs the file {path}, which does not exist. Put the {task} evaluation split there "
            f"(file layout and sources: {root / 'README.md'}), or point HFPRUNE_DATA_DIR at a data folder whose "
            f"tasks/ holds {relative}.")
    return path


# ------------------------------------------------------------------------------------ readers
def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def parse_json_lines(lines, path) -> list:
    """One JSON value per non-blank line; a line that does not parse is an error naming ``path`` and its
    1-based line number (blank lines count)."""
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}, column {err.colno}: not valid JSON ({err.msg}). Every line of a "
                             f".jsonl file must be one complete JSON object: fix that line.") from None
    return out


def _jsonl(path: Path) -> list[dict]:
    with _open_text(path) as fh:
        return parse_json_lines(fh, path)


def read_save_to_disk(path: Path) -> list[dict] | Any:
    """A folder written by ``datasets.Dataset.save_to_disk`` (already in the Hub schema)."""
    import datasets

    return datasets.load_from_disk(str(path))


def read_jsonl(path: Path) -> list[dict]:
    """JSON lines already in the Hub schema (LAMBADA: ``text``)."""
    return _jsonl(path)


def read_arc(path: Path) -> list[dict]:
    """Original AI2 ARC jsonl -> ``allenai/ai2_arc``: ``id, question, choices{text,label}, answerKey``."""
    out = []
    for d in _jsonl(path):
        q = d["question"]
        out.append({"id": d["id"], "question": q["stem"],
                    "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
                    "answerKey": d["answerKey"]})
    return out


def read_boolq(path: Path) -> list[dict]:
    """SuperGLUE BoolQ jsonl -> ``aps/super_glue`` boolq: ``question, passage, idx, label`` (1 = true)."""
    out = []
    for d in _jsonl(path):
        label = d["label"]
        if isinstance(label, str):
            if label.lower() not in ("true", "false"):
                raise ValueError(f"{path}: BoolQ label {label!r} is neither 'true' nor 'false'.")
            label = int(label.lower() == "true")
        out.append({"question": d["question"], "passage": d["passage"], "idx": int(d["idx"]), "label": int(label)})
    return out


_OBQA_CHOICE = re.compile(r"\(([A-Z])\) ")


def read_openbookqa(path: Path) -> list[dict]:
    """Original OpenBookQA TSV -> ``allenai/openbookqa`` main: ``id, question_stem, choices{text,label}, answerKey``."""
    import csv

    out = []
    with _open_text(path) as fh:
        for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            parts = _OBQA_CHOICE.split(row["Choices"])  # ['', 'A', 'text ', 'B', 'text ', ...]
            labels, texts = parts[1::2], [t.rstrip() for t in parts[2::2]]
            if not labels or len(labels) != len(texts):
                raise ValueError(f"{path}: cannot split the choices of {row['ID']!r}: {row['Choices']!r}.")
            out.append({"id": row["ID"], "question_stem": row["Question Stem"],
                        "choices": {"text": texts, "label": labels}, "answerKey": row["Answer Key"]})
    return out


def read_hellaswag_requests(path: Path) -> list[dict]:
    """OLMES HellaSwag request file: one doc per ``doc_id`` below 1,000,000 (the others are unconditional
    requests), in ``doc_id`` order, with the harness's processed fields ``query, choices, gold`` and
    ``label`` (the gold index as a string, as in ``Rowan/hellaswag``)."""
    docs: dict[int, dict] = {}
    for r in _jsonl(path):
        if r.get("doc_id", 0) >= 1_000_000 or r["doc_id"] in docs:
            continue
        d = r["doc"]
        docs[r["doc_id"]] = {"ind": d.get("ind"), "query": d["query"], "choices": list(d["choices"]),
                             "gold": int(d["gold"]), "label": str(int(d["gold"]))}
    return [docs[k] for k in sorted(docs)]


def read_hellaswag_text(path: Path) -> list[dict]:
    """All 10,042 validation items from a 6-lines-per-item text file (``activity_label: ctx``, gold,
    4 endings), cleaned with the harness's HellaSwag ``preprocess``. The file's own clean-up differs from
    the harness's (``ctx_b`` not capitalised, brackets), so scores are close to, not equal to, papers'."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    with _open_text(path) as fh:
        lines = fh.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, gold, 4 endings).")
    out = []
    for i in range(0, len(lines), 6):
        gold = int(lines[i + 1])
        out.append({"query": preprocess(lines[i]), "choices": [preprocess(e) for e in lines[i + 2:i + 6]],
                    "gold": gold, "label": str(gold)})
    return out


READERS: dict[str, Callable[[Path], Any]] = {
    "save_to_disk": read_save_to_disk,
    "jsonl": read_jsonl,
    "arc": read_arc,
    "boolq": read_boolq,
    "openbookqa": read_openbookqa,
    "hellaswag_requests": read_hellaswag_requests,
    "hellaswag_text": read_hellaswag_text,
}


def load(data_files: dict[str, str] | None = None, reader: str | None = None, task: str = "?", **_ignored):
    """``custom_dataset`` of the task configs: a :class:`datasets.DatasetDict` ``{split: Dataset}``.

    ``_ignored`` takes the task ``metadata`` (version, and whatever ``--metadata`` adds), which the
    harness passes along with ``dataset_kwargs``.
    """
    import datasets

    if not data_files or reader not in READERS:
        raise ValueError(f"Task {task!r}: its config needs dataset_kwargs.data_files and a reader "
                         f"({', '.join(READERS)}); got data_files={data_files!r}, reader={reader!r}.")
    root = task_data_dir()
    splits = {}
    for split, relative in data_files.items():
        rows = READERS[reader](resolve_data_file(relative, task, root))
        splits[split] = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
