"""Zero-shot benchmarks through lm-evaluation-harness, offline, on a model in memory or on disk.

The tasks are the harness's own (stock prompts, metrics and scoring: ``acc``, ``acc_norm``, their
stderr, LAMBADA perplexity), configured in ``hfprune/eval/tasks/*.yaml`` to read local copies of
the evaluation splits from ``$HFPRUNE_DATA_DIR/tasks`` (see :mod:`hfprune.eval.taskdata`). The same
folder works with the harness's command line::

    lm_eval --model hf --model_args pretrained=DIR --include_path hfprune/eval/tasks --tasks piqa,boolq

:func:`zeroshot_evaluate` wraps an in-memory model in ``lm_eval.models.huggingface.HFLM`` and runs
``lm_eval.simple_evaluate`` on these configs only (the stock task index is not searched), so a
pruned model is scored without saving it. Task lists may name suites: ``paper-7`` (Wanda,
SparseGPT, ADMM: BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA) and
``llm-pruner-7`` (LLM-Pruner, FLAP: PIQA in place of RTE). The result carries the papers' mean:
the mean ``acc`` over a suite's seven tasks, for every suite the evaluated tasks cover.

Notes:
    ``hellaswag`` is a 1,000-item subset of the validation split in the harness's exact format
    (the original file is not in the data folder); ``hellaswag_full_approx`` has all 10,042 items
    with a slightly different text clean-up (close to, not comparable with, papers' numbers).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from hfprune.card import metric_cell
from hfprune.eval.taskdata import resolve_data_file, task_data_dir
from hfprune.models import load_model, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["TASK_DIR", "SUITES", "MEAN_METRIC", "available_tasks", "expand_tasks", "task_files",
           "check_task_files", "zeroshot_evaluate", "mean_accuracy", "format_results"]

TASK_DIR = Path(__file__).resolve().parent / "tasks"
LM_EVAL_VERSION = "0.4.13"

SUITES: dict[str, tuple[str, ...]] = {
    "paper-7": ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"),
    "llm-pruner-7": ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"),
}
# The metric averaged in the papers' mean (Wanda / SparseGPT tables report lm-eval's ``acc``).
MEAN_METRIC = "acc"


# ------------------------------------------------------------------------------------ configs
def _read_config(path: Path) -> dict:
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    # `!function module.name` stays a string here; the harness resolves it when it builds the task.
    _Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    with open(path, encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_Loader)


def task_configs() -> dict[str, dict]:
    """``{task name: its config}`` for every task config shipped in :data:`TASK_DIR`."""
    out = {}
    for path in sorted(TASK_DIR.glob("*.yaml")):
        cfg = _read_config(path)
        if isinstance(cfg, dict) and "task" in cfg:
            out[cfg["task"]] = {**cfg, "_path": str(path)}
    return out


def available_tasks() -> list[str]:
    """Names of the shipped tasks (suites: :data:`SUITES`)."""
    return sorted(task_configs())


def expand_tasks(tasks: str | Iterable[str]) -> list[str]:
    """Task names from a comma list / sequence of task and suite names, in order, without repeats.

    Raises:
        ValueError: on an empty list or an unknown name (the message lists what is known).
    """
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    known = available_tasks()
    out: list[str] = []
    for name in (t.strip() for t in tasks):
        if not name:
            continue
        members = SUITES.get(name, (name,))
        for task in members:
            if task not in known:
                raise ValueError(f"Unknown zero-shot task {task!r}: use one of {', '.join(known)} or a suite "
                                 f"({', '.join(SUITES)}), comma-separated.")
            if task not in out:
                out.append(task)
    if not out:
        raise ValueError(f"No zero-shot task given: pass e.g. --tasks paper-7 or --tasks piqa,arc_easy "
                         f"(tasks: {', '.join(known)}).")
    return out


def task_files(tasks: str | Iterable[str], root: Path | None = None) -> dict[str, list[Path]]:
    """``{task: [data file paths]}`` as the task configs name them (whether or not they exist)."""
    root = task_data_dir() if root is None else root
    configs = task_configs()
    out = {}
    for task in expand_tasks(tasks):
        files = (configs[task].get("dataset_kwargs") or {}).get("data_files") or {}
        out[task] = [Path(p) if Path(p).is_absolute() else root / p for p in files.values()]
    return out


def check_task_files(tasks: str | Iterable[str]) -> dict[str, list[Path]]:
    """:func:`task_files`, raising before any model work when one is missing.

    Raises:
        MissingTaskDataError: (a ``FileNotFoundError``) naming the first missing file and where it goes.
    """
    root = task_data_dir()
    configs = task_configs()
    out = {}
    for task in expand_tasks(tasks):
        files = (configs[task].get("dataset_kwargs") or {}).get("data_files") or {}
        out[task] = [resolve_data_file(relative, task, root) for relative in files.values()]
    return out


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError as err:
        raise ImportError("Zero-shot tasks run through lm-evaluation-harness: `pip install 'hfprune[eval]'` "
                          f"(or `pip install lm-eval=={LM_EVAL_VERSION}`).") from err
    if getattr(lm_eval, "__version__", LM_EVAL_VERSION) != LM_EVAL_VERSION:
        logger.warning("lm-eval %s is installed; the task configs were written for %s.", lm_eval.__version__,
                       LM_EVAL_VERSION)
    return lm_eval


# ------------------------------------------------------------------------------------ evaluation
def _metrics(raw: dict) -> dict:
    """``{"acc,none": x, "acc_stderr,none": s, "alias": ...}`` -> ``{"acc": x, "acc_stderr": s}``."""
    out = {}
    for key, value in raw.items():
        name, _, flt = key.partition(",")
        if flt in ("", "none") and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _means(tasks: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for suite, members in SUITES.items():
        if all(t in tasks and MEAN_METRIC in tasks[t] for t in members):
            values = [tasks[t][MEAN_METRIC] for t in members]
            out[suite] = {MEAN_METRIC: sum(values) / len(values), "tasks": list(members)}
    return out


def check_zeroshot_args(limit=None, batch_size=16, num_fewshot=0) -> tuple[int | float | None, int | str, int]:
    """``(limit, batch_size, num_fewshot)`` checked and normalised before the harness sees them (its own
    errors for these are internal ``islice`` / ``NaN`` messages, or none at all).

    ``limit``: ``None``, a whole number of documents >= 1, or a fraction in (0, 1); ``batch_size``: a whole
    number >= 1, ``"auto"`` or ``"auto:N"``; ``num_fewshot``: a whole number >= 0."""
    import math

    if limit is not None:
        bad = isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0 \
            or (limit >= 1 and limit != int(limit))
        if bad:
            raise ValueError(f"limit (--limit) must be a whole number of documents >= 1 or a fraction in (0, 1), "
                             f"got {limit!r}: e.g. --limit 100, or leave it out to score every document.")
        limit = int(limit) if limit >= 1 else float(limit)
    text = str(batch_size).strip().lower()
    if isinstance(batch_size, bool):
        text = ""
    if text.isdigit() and int(text) >= 1:
        batch_size = int(text)
    elif not (text == "auto" or (text.startswith("auto:") and text[5:].isdigit() and int(text[5:]) >= 1)):
        raise ValueError(f"batch_size (--batch-size) must be a whole number >= 1, 'auto' or 'auto:N', got "
                         f"{batch_size!r}.")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot (--num-fewshot) must be a whole number >= 0 (0: the papers' zero-shot "
                         f"protocol), got {num_fewshot!r}.")
    return limit, batch_size, num_fewshot


def zeroshot_evaluate(model, tokenizer=None, tasks: str | Sequence[str] = "paper-7", *, limit: int | float | None = None,
                      batch_size: int | str = 16, num_fewshot: int = 0, max_length: int | None = None,
                      bootstrap_iters: int = 100000, log_samples: bool = False,
                      **simple_evaluate_kwargs) -> dict:
    """Zero-shot scores of ``model`` on lm-evaluation-harness tasks read from local files.

    Args:
        model: a loaded ``transformers`` causal LM (pruned in memory or loaded from disk), or a local
            checkpoint path (then loaded with :func:`hfprune.load_model`, which also reads hfprune's
            sparse format).
        tokenizer: its tokenizer (loaded from ``model``'s path when ``model`` is a path).
        tasks: task and suite names, comma-separated or a list (:func:`expand_tasks`).
        limit: score only the first ``limit`` documents of every task (a float in (0, 1): that fraction).
        batch_size: requests per forward pass (harness ``batch_size``; ``"auto"`` searches for the largest).
        num_fewshot: 0 for the papers' zero-shot protocol.
        max_length: longest input; default the model's ``max_position_embeddings``.
        bootstrap_iters: bootstrap resamples for stderrs that have no closed form (LAMBADA perplexity).
        log_samples: keep per-document outputs under ``"samples"``.

    The harness draws its own progress bars (stderr) for the loglikelihood requests.

    Returns:
        ``{"tasks": {task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "perplexity", ...,
        "n": documents scored}}, "means": {suite: {"acc", "tasks"}}, "limit", "batch_size",
        "num_fewshot", "lm_eval_version", "task_dir", "data_dir", "seconds"}``.

    Raises:
        MissingTaskDataError: a task's data file is missing (raised before the model is touched).
        ImportError: lm-eval is not installed.
    """
    names = expand_tasks(tasks)
    check_task_files(names)
    limit, batch_size, num_fewshot = check_zeroshot_args(limit, batch_size, num_fewshot)
    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if isinstance(model, (str, os.PathLike)):
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        model = load_model(model)
    if tokenizer is None:
        raise ValueError("Pass the model's tokenizer: zeroshot_evaluate(model, tokenizer, tasks=...).")
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    # The harness logs at INFO for every task and request type; keep it to warnings unless asked.
    harness_logger = logging.getLogger("lm_eval")
    old_level = harness_logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        harness_logger.setLevel(logging.WARNING)
    offline = os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # the task data are local files: never look for Hub copies
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
        with torch.no_grad():  # the harness's HFLM scores under no_grad too; this holds for any version
            raw = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, bootstrap_iters=bootstrap_iters,
                                          log_samples=log_samples, **simple_evaluate_kwargs)
    finally:
        harness_logger.setLevel(old_level)
        if offline is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = offline
        model.train(was_training)
    if raw is None:  # only on non-zero ranks of a multi-process run
        return {}
    seconds = time.perf_counter() - start
    results: dict[str, dict] = {}
    for task in names:
        metrics = _metrics(raw["results"].get(task, {}))
        n = (raw.get("n-samples") or {}).get(task) or {}
        metrics["n"] = int(n.get("effective", n.get("original", 0)) or 0)
        metrics["n_total"] = int(n.get("original", 0) or 0)
        results[task] = metrics
    out: dict[str, Any] = {
        "tasks": results,
        "means": _means(results),
        "mean_metric": MEAN_METRIC,
        "limit": limit,
        "batch_size": batch_size,
        "num_fewshot": num_fewshot,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "task_dir": str(TASK_DIR),
        "data_dir": str(task_data_dir()),
        "seconds": seconds,
    }
    if log_samples:
        out["samples"] = raw.get("samples")
    return out


# ------------------------------------------------------------------------------------ reports
def format_results(result: dict) -> str:
    """A plain-text table of :func:`zeroshot_evaluate`'s result: one row per task, then the means."""
    lines = [f"{'task':<22} {'n':>6} {'acc':>8} {'± stderr':>9} {'acc_norm':>9} {'± stderr':>9} {'perplexity':>11}"]
    for task, m in result["tasks"].items():
        lines.append(f"{task:<22} {m.get('n', 0):>6} {metric_cell(m.get('acc')):>8} "
                     f"{metric_cell(m.get('acc_stderr')):>9} "
                     f"{metric_cell(m.get('acc_norm')):>9} {metric_cell(m.get('acc_norm_stderr')):>9} "
                     f"{metric_cell(m.get('perplexity'), '.3f'):>11}")
    for suite, m in result.get("means", {}).items():
        lines.append(f"{'mean ' + suite:<22} {'':>6} {metric_cell(m[MEAN_METRIC]):>8}")
    limit = result.get("limit")
    lines.append(f"lm-eval {result.get('lm_eval_version')}, {result.get('num_fewshot', 0)}-shot"
                 + (f", --limit {limit}" if limit else ", full splits") + f", {result.get('seconds', 0):.1f} s")
    return "\n".join(lines)


def mean_accuracy(result: dict) -> float | None:
    """Mean ``acc`` over the evaluated tasks that report it (for a suite's tasks: the papers' mean);
    the single number :func:`hfprune.workflows.sweep.sweep` tabulates and :func:`hfprune.workflows.sweep.search` budgets."""
    values = [m[MEAN_METRIC] for m in (result.get("tasks") or {}).values() if MEAN_METRIC in m]
    return sum(values) / len(values) if values else None
