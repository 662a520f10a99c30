"""Choosing the ratio: perplexity over a grid of (method, pattern, sparsity), and a budget search.

:func:`sweep` prunes the same dense model at every point of a grid and measures perplexity. The
dense weights are kept in memory (a copy of the state dict) and put back before every point,
which is much cheaper than reloading the checkpoint; the calibration token ids and the
evaluation token ids are computed once and reused, so every point sees exactly the same data.

With an ``output_dir`` every finished point is appended to ``results.jsonl`` at once (flushed and
fsynced), so an interrupted sweep loses at most the point it was working on; running it again
with the same folder skips the points already there (pass ``overwrite=True`` to start afresh).
``results.csv``, ``results.json`` and the plot ``sweep.png`` (perplexity vs sparsity, log scale,
one line per method and unstructured pattern, N:M points as markers, dense as a horizontal line)
are rewritten through a temporary file and a rename.

:func:`search` finds the highest unstructured sparsity whose perplexity stays within a budget
(``max_ppl_increase`` relative to dense, or ``max_ppl`` absolute) by bracketing and bisection,
and reports every probe. It assumes perplexity grows with sparsity (true in practice for one-shot
pruning, though small wiggles between close sparsities are possible).

Example:
    >>> # rows = sweep("smollm2-135m", ["magnitude", "wanda"], [0.3, 0.5, 0.7], ["unstructured", "2:4"],
    >>> #              calibration="c4", nsamples=64, seqlen=512, max_windows=8, output_dir="bench_out/sweep")
    >>> # best = search("smollm2-135m", method="wanda", max_ppl_increase=0.1, max_windows=8)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from hfprune.io import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["sweep", "search", "plot_sweep", "format_table", "format_probes", "read_jsonl"]

RESULTS_JSONL = "results.jsonl"
SEARCH_JSONL = "search.jsonl"
DENSE = "dense"


# ------------------------------------------------------------------------------------ file helpers
def _append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a results / probes file; a line cut short by an interruption is skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("Skipping unreadable line %d of %s (an interrupted write?).", n, path)
    return rows


def _fingerprint(value: Any) -> Any:
    """A JSON-able stand-in for a setting: names stay, tensors and text lists become a short hash."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    h = hashlib.sha1()
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
        return f"<Tensor {list(t.shape)} {h.hexdigest()[:12]}>"
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        for v in value:
            h.update(v.encode("utf-8", "replace") + b"\0")
        return f"<{len(value)} texts {h.hexdigest()[:12]}>"
    if isinstance(value, dict):
        return {str(k): _fingerprint(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if callable(value):
        return f"<callable {getattr(value, '__qualname__', type(value).__name__)}>"
    return f"<{type(value).__name__}>"


def _split_list(value, cast=str) -> list:
    if value is None:
        return []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    out = []
    for v in value:
        if v == "":
            continue
        try:
            out.append(cast(v))
        except (TypeError, ValueError):
            raise ValueError(f"{v!r} in {value!r} is not a {cast.__name__}: use a comma-separated list such as "
                             f"0.3,0.5,0.7.") from None
    return out


# ------------------------------------------------------------------------------------ point runner
class _PointRunner:
    """Holds the model, its dense weights and the shared token ids; prunes + evaluates one point."""

    def __init__(self, model_or_loader, tokenizer=None, *, calibration="c4", nsamples=None, seqlen=None, seed=None,
                 eval_dataset="wikitext2", eval_seqlen=None, max_windows=None, dtype=None,
                 method_kwargs: dict[str, dict] | None = None, tasks=None, task_limit=None, task_batch_size=16):
        from hfprune.models import load_model, load_tokenizer

        self.tasks = None
        if tasks:  # zero-shot column: bad names / missing task files fail before the model is loaded
            from hfprune.eval.harness import check_task_files, expand_tasks

            self.tasks = expand_tasks(tasks)
            check_task_files(self.tasks)
        self.task_limit, self.task_batch_size = task_limit, task_batch_size

        self.model_label = None
        if isinstance(model_or_loader, (str, os.PathLike)):
            self.model_label = os.fspath(model_or_loader)
            model = load_model(model_or_loader, dtype=dtype)
            if tokenizer is None:
                tokenizer = load_tokenizer(model_or_loader)
        elif isinstance(model_or_loader, torch.nn.Module):
            model = model_or_loader
        elif callable(model_or_loader):
            loaded = model_or_loader()
            if isinstance(loaded, tuple):
                model, tok = loaded
                tokenizer = tokenizer if tokenizer is not None else tok
            else:
                model = loaded
        else:
            raise TypeError("Pass a model name/path, a loaded model, or a callable returning a model or "
                            "(model, tokenizer).")
        if self.model_label is None:
            self.model_label = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.calibration = calibration
        self.calib_overrides = {"nsamples": nsamples, "seqlen": seqlen, "seed": seed}
        self.eval_dataset = eval_dataset
        from hfprune.eval.perplexity import resolve_eval_seqlen

        self.eval_seqlen = resolve_eval_seqlen(model.config, eval_seqlen)
        self.max_windows = max_windows
        self.method_kwargs = dict(method_kwargs or {})
        self._calib_ids: torch.Tensor | None = None
        self._eval_ids: torch.Tensor | None = None
        # One copy per tensor storage (tied embeddings / lm_head are copied once).
        by_ptr: dict[int, torch.Tensor] = {}
        self.dense_state = {}
        for name, t in model.state_dict().items():
            key = t.data_ptr()
            if key not in by_ptr:
                by_ptr[key] = t.detach().clone()
            self.dense_state[name] = by_ptr[key]
        # Which dense weights the rows were measured on (a sample of every tensor: cheap, and another
        # checkpoint under the same name or path gives another digest).
        digest = hashlib.sha256()
        for name in sorted(self.dense_state):
            t = self.dense_state[name].reshape(-1)
            digest.update(name.encode() + t[:: max(1, t.numel() // 256)][:256].float().numpy().tobytes())
        self.weights_digest = digest.hexdigest()[:16]

    def settings(self) -> dict:
        from hfprune.core.calibration import resolve_calibration

        calib = resolve_calibration(self.calibration, **self.calib_overrides)
        return {
            "model": self.model_label,
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "weights": self.weights_digest,
            "calibration": _fingerprint(calib.dataset),
            "nsamples": calib.nsamples,
            "seqlen": calib.seqlen,
            "seed": calib.seed,
            "eval_dataset": _fingerprint(self.eval_dataset),
            "eval_seqlen": self.eval_seqlen,
            "max_windows": self.max_windows,
            "method_kwargs": _fingerprint(self.method_kwargs),
            **({"tasks": self.tasks, "task_limit": self.task_limit} if self.tasks else {}),
        }

    def calibration_ids(self) -> torch.Tensor:
        if self._calib_ids is None:
            from hfprune.core.calibration import get_calibration_ids
            from hfprune.core.calibration import resolve_calibration

            calib = resolve_calibration(self.calibration, **self.calib_overrides)
            self.restore()
            self._calib_ids = get_calibration_ids(calib, self.tokenizer, self.model)
            logger.info("Calibration ids %s computed once for the whole run.", tuple(self._calib_ids.shape))
        return self._calib_ids

    def eval_ids(self) -> torch.Tensor:
        if self._eval_ids is None:
            from hfprune.eval.perplexity import eval_token_ids

            if self.tokenizer is None and not isinstance(self.eval_dataset, torch.Tensor):
                raise ValueError("Evaluating on text needs a tokenizer: pass tokenizer= (or token ids as eval_dataset).")
            self._eval_ids = eval_token_ids(self.tokenizer, self.eval_dataset)
        return self._eval_ids

    @torch.no_grad()
    def restore(self) -> None:
        self.model.load_state_dict(self.dense_state, strict=True)
        if hasattr(self.model.config, "pruning_config"):
            del self.model.config.pruning_config

    def config(self, method: str, pattern: str, sparsity: float):
        from hfprune.config import PruningConfig
        from hfprune.solvers.masks import parse_pattern

        data = {"method": method, "pattern": pattern, **self.method_kwargs.get(method, {})}
        if not parse_pattern(pattern).is_nm:
            data["sparsity"] = sparsity
        return PruningConfig.from_dict(data)

    def run(self, method: str, pattern: str, sparsity: float) -> dict:
        """Restore the dense weights, prune (unless ``method == "dense"``) and measure perplexity."""
        from hfprune.core.engine import prune
        from hfprune.eval.perplexity import perplexity
        from hfprune.registry import get_pruner_cls

        start = time.perf_counter()
        self.restore()
        row: dict[str, Any] = {"method": method, "pattern": pattern, "sparsity": float(sparsity)}
        if method == DENSE or sparsity == 0.0 and pattern == "unstructured":
            row.update(achieved_sparsity=0.0, prune_seconds=0.0)
        else:
            config = self.config(method, pattern, sparsity)
            needs_data = get_pruner_cls(config.method).requires_calibration or config.owl
            # Data-free methods ignore `calibration`; the others get the ids drawn once for the whole run.
            calibration = self.calibration_ids() if needs_data else self.calibration
            report = prune(self.model, self.tokenizer, config, calibration, progress=False)
            row.update(achieved_sparsity=report.sparsity, prune_seconds=report.prune_seconds,
                       peak_rss_mb=report.peak_rss_mb)
        result = perplexity(self.model, self.tokenizer, seqlen=self.eval_seqlen, max_windows=self.max_windows,
                            token_ids=self.eval_ids(), progress=False)
        row.update(perplexity=result["perplexity"], nll=result["nll"], windows=result["windows"],
                   tokens=result["tokens"], eval_seconds=result["seconds"])
        if self.tasks:
            from hfprune.eval.harness import mean_accuracy, zeroshot_evaluate

            zs = zeroshot_evaluate(self.model, self.tokenizer, self.tasks, limit=self.task_limit,
                                   batch_size=self.task_batch_size)
            row.update(zeroshot_acc=mean_accuracy(zs), zeroshot=zs["tasks"], zeroshot_seconds=zs["seconds"])
        row["seconds"] = time.perf_counter() - start
        return row


# ------------------------------------------------------------------------------------ sweep
def _key(method: str, pattern: str, sparsity: float) -> str:
    return f"{method}|{pattern}|{sparsity:.4f}"


def _grid(methods: Sequence[str], sparsities: Sequence[float], patterns: Sequence[str]) -> list[tuple[str, str, float]]:
    from hfprune.solvers.masks import parse_pattern
    from hfprune.registry import available_methods

    known = available_methods()
    for m in methods:
        if m not in known:
            raise ValueError(f"Unknown method {m!r}: use one of {', '.join(known)} (see `hfprune methods`).")
    if not methods or not patterns or (not sparsities and any(not parse_pattern(p).is_nm for p in patterns)):
        raise ValueError(f"The grid is empty (methods={list(methods)}, patterns={list(patterns)}, sparsities="
                         f"{list(sparsities)}): give at least one method (--methods), pattern (--patterns) and, for "
                         f"unstructured, one sparsity (--sparsities).")
    points = [(DENSE, DENSE, 0.0)]
    for method in methods:
        for pattern in patterns:
            pat = parse_pattern(pattern)
            if pat.is_nm:  # the pattern fixes the sparsity: one point per method
                points.append((method, str(pat), float(pat.sparsity)))
            else:
                for s in sparsities:
                    s = float(s)
                    if not 0.0 < s < 1.0:
                        raise ValueError(f"Sparsity {s} is outside (0, 1): fix --sparsities.")
                    points.append((method, "unstructured", s))
    seen, out = set(), []
    for p in points:
        if _key(*p) not in seen:
            seen.add(_key(*p))
            out.append(p)
    return out


def _with_ratios(rows: list[dict]) -> list[dict]:
    dense = next((r["perplexity"] for r in rows if r["method"] == DENSE), None)
    out = []
    for r in rows:
        r = dict(r)
        if dense:
            r["ppl_increase"] = r["perplexity"] / dense - 1.0
        out.append(r)
    return out


def _sort_rows(rows: list[dict], order: dict[str, int]) -> list[dict]:
    def key(r):
        return (r["method"] != DENSE, order.get(r["key"], 10**6), r["method"], r["pattern"], r["sparsity"])

    return sorted(rows, key=key)


_CSV_COLUMNS = ["method", "pattern", "sparsity", "achieved_sparsity", "perplexity", "ppl_increase", "zeroshot_acc",
                "nll", "windows", "tokens", "prune_seconds", "eval_seconds", "zeroshot_seconds", "seconds",
                "peak_rss_mb", "finished_at", "key"]


def _write_outputs(out: Path, rows: list[dict], settings: dict, plot: bool) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    atomic_write(out / "results.csv", buf.getvalue())
    atomic_write(out / "results.json", json.dumps({"settings": settings, "rows": rows}, indent=2, default=str) + "\n")
    if plot:
        name = Path(str(settings.get("model") or "model")).name
        plot_sweep(rows, out / "sweep.png", title=f"{name}: perplexity vs sparsity")


def sweep(model_name_or_loader, methods: Sequence[str] | str = ("magnitude", "wanda", "sparsegpt"),
          sparsities: Sequence[float] | str = (0.3, 0.4, 0.5, 0.6, 0.7),
          patterns: Sequence[str] | str = ("unstructured",), *, tokenizer=None, calibration: Any = "c4",
          nsamples: int | None = None, seqlen: int | None = None, seed: int | None = None,
          eval_dataset: Any = "wikitext2", eval_seqlen: int | None = None, max_windows: int | None = None,
          output_dir: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
          dtype=None, method_kwargs: dict[str, dict] | None = None, plot: bool = True, tasks=None,
          task_limit: int | None = None, task_batch_size: int = 16) -> list[dict]:
    """Perplexity at every (method, pattern, sparsity) of a grid, dense baseline first.

    Args:
        model_name_or_loader: a checkpoint path / Hub id / alias (``"smollm2-135m"``), a loaded model
            (its dense weights are put back at the end), or a callable returning a model or
            ``(model, tokenizer)``.
        methods, sparsities, patterns: the grid (lists or comma-separated strings). N:M patterns fix
            the sparsity, so they run once per method whatever ``sparsities`` holds.
        tokenizer: needed for text data when the loader does not return one.
        calibration, nsamples, seqlen, seed: as for :func:`hfprune.prune`; the token ids are drawn once
            (only if a method needs data) and reused for every point.
        eval_dataset, eval_seqlen, max_windows: as for :func:`hfprune.perplexity` (``max_windows``: only
            the first K windows, to fit CPU time).
        output_dir: where ``results.jsonl`` (one line per finished point), ``results.csv``,
            ``results.json`` and ``sweep.png`` go; ``None`` writes nothing. The output files list every
            point of the folder's ``results.jsonl`` (earlier grids with the same settings included).
        overwrite: discard earlier results in ``output_dir`` instead of resuming from them.
        method_kwargs: extra config fields per method, e.g. ``{"sparsegpt": {"blocksize": 64}}``.
        plot: write ``sweep.png`` (needs matplotlib).
        tasks, task_limit, task_batch_size: also score lm-evaluation-harness zero-shot tasks / suites
            (``"paper-7"``) at every point (:func:`hfprune.eval.harness.zeroshot_evaluate`): the row gets
            ``zeroshot`` (per-task metrics) and ``zeroshot_acc`` (mean ``acc`` over the tasks).

    Returns:
        One dict per point of the grid (``method``, ``pattern``, ``sparsity``, ``achieved_sparsity``,
        ``perplexity``, ``ppl_increase`` over dense, ``nll``, ``prune_seconds``, ``eval_seconds``...), dense first.

    Raises:
        ValueError: ``output_dir`` holds results made with other settings and ``overwrite`` is not set.
    """
    from tqdm.auto import tqdm

    methods = _split_list(methods)
    sparsities = _split_list(sparsities, float)
    patterns = _split_list(patterns) or ["unstructured"]
    points = _grid(methods, sparsities, patterns)
    order = {_key(*p): i for i, p in enumerate(points)}
    out = Path(output_dir) if output_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise FileExistsError(f"Output path {out} is a file: choose a folder for --output.")

    runner = _PointRunner(model_name_or_loader, tokenizer, calibration=calibration, nsamples=nsamples, seqlen=seqlen,
                          seed=seed, eval_dataset=eval_dataset, eval_seqlen=eval_seqlen, max_windows=max_windows,
                          dtype=dtype, method_kwargs=method_kwargs, tasks=tasks, task_limit=task_limit,
                          task_batch_size=task_batch_size)
    for method, pattern, s in points:  # fail on a bad config before any slow work
        if method != DENSE:
            runner.config(method, pattern, s)
    settings = runner.settings()

    done: dict[str, dict] = {}
    if out is not None:
        jsonl = out / RESULTS_JSONL
        if overwrite:
            for name in (RESULTS_JSONL, "results.csv", "results.json", "sweep.png"):
                (out / name).unlink(missing_ok=True)
        for row in read_jsonl(jsonl):
            if row.get("settings") != settings:
                raise ValueError(
                    f"{jsonl} holds results made with other settings ({row.get('settings')} vs {settings}): "
                    f"pass overwrite=True (--overwrite) to discard them, or choose another output folder."
                )
            done[row["key"]] = row
        if done:
            logger.info("Resuming: %d point(s) already in %s.", sum(k in done for k in order), jsonl)

    todo = [p for p in points if _key(*p) not in done]
    rows = dict(done)
    bar = tqdm(todo, desc="sweep", unit="point", disable=not progress, file=sys.stderr)
    try:
        for method, pattern, s in bar:
            key = _key(method, pattern, s)
            bar.set_description(f"sweep {method} {pattern} {s:.2f}")
            row = runner.run(method, pattern, s)
            row.update(key=key, settings=settings, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            rows[key] = row
            bar.set_postfix(ppl=f"{row['perplexity']:.2f}")
            logger.info("%s %s %.2f: perplexity %.3f (prune %.1f s, eval %.1f s)", method, pattern, s,
                        row["perplexity"], row["prune_seconds"], row["eval_seconds"])
            if out is not None:
                _append_jsonl(out / RESULTS_JSONL, row)
                _write_outputs(out, _with_ratios(_sort_rows(list(rows.values()), order)), settings, plot=False)
    finally:
        bar.close()
        runner.restore()
    all_rows = _with_ratios(_sort_rows(list(rows.values()), order))
    if out is not None:
        _write_outputs(out, all_rows, settings, plot=plot)
    wanted = set(order)
    return [r for r in all_rows if r["key"] in wanted]


# ------------------------------------------------------------------------------------ plot / tables
def plot_sweep(rows: Iterable[dict], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Perplexity vs sparsity (log y): one line per method (unstructured), N:M points as markers,
    dense as a dashed horizontal line. Written through a temporary file and a rename."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("The sweep plot needs matplotlib: `pip install matplotlib` (or pass plot=False).") from err
    rows = list(rows)
    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != DENSE))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    nm_markers = ["s", "D", "^", "v", "P", "X"]
    nm_patterns = list(dict.fromkeys(r["pattern"] for r in rows if r["pattern"] not in (DENSE, "unstructured")))
    finite = [r["perplexity"] for r in rows if r.get("perplexity") is not None and math.isfinite(r["perplexity"])]
    for r in rows:
        if r["method"] == DENSE and r.get("perplexity") is not None:
            ax.axhline(r["perplexity"], color="gray", linestyle="--", linewidth=1,
                       label=f"dense ({r['perplexity']:.2f})")
    for m in methods:
        pts = sorted((r["sparsity"], r["perplexity"]) for r in rows
                     if r["method"] == m and r["pattern"] == "unstructured")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[m], label=f"{m} unstructured")
        for k, pat in enumerate(nm_patterns):
            pts = [(r["sparsity"], r["perplexity"]) for r in rows if r["method"] == m and r["pattern"] == pat]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=nm_markers[k % len(nm_markers)], s=70,
                           color=colors[m], edgecolors="black", zorder=3, label=f"{m} {pat}")
    if finite and min(finite) > 0:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _pos: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)  # 10, 100, 1000 rather than 10^1, 10^2...
        ax.yaxis.set_minor_formatter(plain if max(finite) / min(finite) < 10 else NullFormatter())
    ax.set_xlabel("sparsity (fraction of weights removed from the pruned layers)")
    ax.set_ylabel("perplexity (log scale)")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    atomic_write(path, buf.getvalue())
    return path


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def format_table(rows: Iterable[dict]) -> str:
    """A Markdown table of sweep rows."""
    rows = list(rows)
    zs = any("zeroshot_acc" in r for r in rows)  # the zero-shot column, when the sweep scored tasks
    lines = ["| method | pattern | sparsity | achieved | perplexity | vs dense |" + (" zero-shot acc |" if zs else "")
             + " prune s | eval s |", "|---|---|---:|---:|---:|---:|" + ("---:|" if zs else "") + "---:|---:|"]
    for r in rows:
        inc = r.get("ppl_increase")
        lines.append(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.2f} | {_fmt(r.get('achieved_sparsity'), '.4f')} "
                     f"| {_fmt(r.get('perplexity'), '.3f')} | {'-' if inc is None else f'{100 * inc:+.1f}%'} |"
                     + (f" {_fmt(r.get('zeroshot_acc'), '.4f')} |" if zs else "")
                     + f" {_fmt(r.get('prune_seconds'), '.1f')} | {_fmt(r.get('eval_seconds'), '.1f')} |")
    return "\n".join(lines)


def format_probes(result: dict) -> str:
    """A Markdown table of a :func:`search` result's probes."""
    zs = any("zeroshot_acc" in p for p in result["probes"])
    lines = ["| step | phase | sparsity | perplexity |" + (" zero-shot acc |" if zs else "") + " within budget |",
             "|---:|---|---:|---:|" + ("---:|" if zs else "") + "---|"]
    for p in result["probes"]:
        lines.append(f"| {p['step']} | {p['phase']} | {p['sparsity']:.4f} | {_fmt(p.get('perplexity'), '.3f')} |"
                     + (f" {_fmt(p.get('zeroshot_acc'), '.4f')} |" if zs else "")
                     + f" {'yes' if p['within_budget'] else 'no'} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ search
def search(model=None, tokenizer=None, method: str = "wanda", *, max_ppl_increase: float | None = None,
           max_ppl: float | None = None, pattern: str = "unstructured", lo: float = 0.3, hi: float = 0.7,
           tol: float = 0.02, max_sparsity: float = 0.95, max_probes: int = 25, calibration: Any = "c4",
           nsamples: int | None = None, seqlen: int | None = None, seed: int | None = None,
           eval_dataset: Any = "wikitext2", eval_seqlen: int | None = None, max_windows: int | None = None,
           output_dir: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
           dtype=None, method_kwargs: dict | None = None,
           evaluate_fn: Callable[[float], float | dict] | None = None, max_acc_drop: float | None = None,
           tasks=None, task_limit: int | None = None, task_batch_size: int = 16) -> dict:
    """The highest sparsity of ``method`` whose perplexity stays within a budget.

    The budget is ``dense_ppl * (1 + max_ppl_increase)`` (e.g. ``0.1`` = at most 10 % worse) or
    ``max_ppl``. Probes: dense (0.0), then ``lo`` and ``hi`` (by default the 30-70 % range around
    the usual 50 %); when ``hi`` is still within budget the range grows upward in steps of
    ``hi - lo`` up to ``max_sparsity``; when ``lo`` is already over it the range becomes ``[0, lo]``.
    Then bisection until the bracket is narrower than ``tol``.

    With ``max_acc_drop`` (and ``tasks``, e.g. ``"paper-7"``) the budget is zero-shot quality instead:
    the mean ``acc`` over the tasks (lm-evaluation-harness, :func:`hfprune.eval.harness.zeroshot_evaluate`)
    may fall at most ``max_acc_drop`` (absolute, e.g. ``0.02`` = two points) below dense.

    Args:
        model: a model name / path / alias, a loaded model, or a callable returning a model or
            ``(model, tokenizer)``; ``None`` only together with ``evaluate_fn``.
        max_acc_drop, tasks, task_limit, task_batch_size: the zero-shot budget (see above); every probe
            then also records ``zeroshot_acc`` and per-task ``zeroshot`` metrics.
        evaluate_fn: replaces prune + perplexity: ``evaluate_fn(sparsity) -> perplexity`` (or a dict
            with ``"perplexity"``); sparsity 0.0 means dense. For tests and custom metrics.
        output_dir: probes go to ``search.jsonl`` as they finish, the result to ``search.json``.
            Probes already in ``search.jsonl`` with the same settings are reused (not evaluated again)
            unless ``overwrite``.
        Other arguments: as for :func:`sweep`.

    Returns:
        ``{"sparsity": best (None when even dense is over budget), "perplexity", "dense_perplexity",
        "budget_ppl", "converged", "probes": [{"step", "phase", "sparsity", "perplexity",
        "within_budget", ...}], ...}``.
    """
    from hfprune.solvers.masks import parse_pattern

    if sum(b is not None for b in (max_ppl_increase, max_ppl, max_acc_drop)) != 1:
        raise ValueError("Give exactly one budget: max_ppl_increase (relative, e.g. 0.1 for +10 %), "
                         "max_ppl (absolute perplexity) or max_acc_drop (zero-shot accuracy points, with tasks=).")
    if max_acc_drop is not None and (max_acc_drop < 0 or not tasks and evaluate_fn is None):
        raise ValueError(f"max_acc_drop needs tasks= (e.g. 'paper-7', --tasks) and must be >= 0 (0.02 = two "
                         f"points below dense), got {max_acc_drop} with tasks={tasks!r}.")
    if max_ppl_increase is not None and max_ppl_increase < 0:
        raise ValueError(f"max_ppl_increase must be >= 0 (0.1 means 10 % above dense), got {max_ppl_increase}.")
    if max_ppl is not None and max_ppl <= 0:
        raise ValueError(f"max_ppl must be a positive perplexity, got {max_ppl}.")
    if parse_pattern(pattern).is_nm:
        raise ValueError(f"pattern={pattern!r} fixes the sparsity, so there is nothing to search: use "
                         f"pattern='unstructured' (and compare N:M patterns with sweep).")
    if not 0.0 < lo < hi <= max_sparsity < 1.0:
        raise ValueError(f"Need 0 < lo < hi <= max_sparsity < 1, got lo={lo}, hi={hi}, max_sparsity={max_sparsity}.")
    if not 0.0 < tol < hi - lo + 1e-12:
        raise ValueError(f"tol must be in (0, hi - lo], got {tol}.")

    if evaluate_fn is None:
        if model is None:
            raise ValueError("Pass a model (name, path, model or loader), or evaluate_fn for a custom metric.")
        runner = _PointRunner(model, tokenizer, calibration=calibration, nsamples=nsamples, seqlen=seqlen, seed=seed,
                              eval_dataset=eval_dataset, eval_seqlen=eval_seqlen, max_windows=max_windows,
                              dtype=dtype, method_kwargs=method_kwargs, tasks=tasks, task_limit=task_limit,
                              task_batch_size=task_batch_size)
        runner.config(method, pattern, lo)  # fail fast on an unknown method / bad kwargs
        settings = {"method": method, "pattern": "unstructured", **runner.settings()}

        def evaluate_point(s: float) -> dict:
            return runner.run(DENSE if s == 0.0 else method, "unstructured", s)
    else:
        runner = None
        settings = {"method": method, "pattern": "unstructured", "evaluate_fn": _fingerprint(evaluate_fn)}

        def evaluate_point(s: float) -> dict:
            value = evaluate_fn(s)
            row = dict(value) if isinstance(value, dict) else {"perplexity": float(value)}
            if "perplexity" not in row:
                raise ValueError("evaluate_fn must return a perplexity, or a dict with a 'perplexity' key.")
            row["perplexity"] = float(row["perplexity"])
            if max_acc_drop is not None and "zeroshot_acc" not in row:
                raise ValueError("With max_acc_drop, evaluate_fn must return a dict with 'zeroshot_acc'.")
            return row

    out = Path(output_dir) if output_dir is not None else None
    cache: dict[float, dict] = {}
    if out is not None:
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"Output path {out} is a file: choose a folder for --output.")
        if overwrite:
            for name in (SEARCH_JSONL, "search.json"):
                (out / name).unlink(missing_ok=True)
        for row in read_jsonl(out / SEARCH_JSONL):
            if row.get("settings") != settings:
                raise ValueError(
                    f"{out / SEARCH_JSONL} holds probes made with other settings ({row.get('settings')} vs "
                    f"{settings}): pass overwrite=True (--overwrite) or choose another output folder."
                )
            cache[round(float(row["sparsity"]), 6)] = row

    probes: list[dict] = []
    budget: list[float] = []  # set after the dense probe
    metric = "zeroshot_acc" if max_acc_drop is not None else "perplexity"

    def within(value) -> bool:  # value: the probe's perplexity (lower is better) or zero-shot accuracy
        if value is None or not math.isfinite(value):
            return False
        return value >= budget[0] if metric == "zeroshot_acc" else value <= budget[0]

    def probe(s: float, phase: str) -> bool:
        s = round(float(s), 6)
        for p in probes:
            if p["sparsity"] == s:
                return p["within_budget"] if budget else True
        if s in cache:
            row = dict(cache[s])
            row["reused"] = True
        else:
            if len(probes) >= max_probes:
                raise RuntimeError(f"search used all max_probes={max_probes} evaluations: raise max_probes or tol.")
            row = evaluate_point(s)
            row["sparsity"] = s
            row.update(settings=settings, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            if out is not None:
                _append_jsonl(out / SEARCH_JSONL, row)
            row["reused"] = False
        row.update(step=len(probes), phase=phase)
        if budget:
            row["within_budget"] = within(row.get(metric))
        probes.append(row)
        bar.update(1)
        bar.set_postfix(sparsity=f"{s:.4f}", ppl=f"{row['perplexity']:.3f}",
                        ok="-" if not budget else ("yes" if row["within_budget"] else "no"))
        logger.info("search probe %.4f: perplexity %.3f", s, row["perplexity"])
        return row.get("within_budget", True)

    from tqdm.auto import tqdm

    start = time.perf_counter()
    bar = tqdm(desc=f"search {method}", unit="probe", disable=not progress, file=sys.stderr)
    try:
        probe(0.0, "dense")
        dense_ppl = probes[0]["perplexity"]
        if metric == "zeroshot_acc":
            budget.append(probes[0]["zeroshot_acc"] - max_acc_drop)
        else:
            budget.append(dense_ppl * (1.0 + max_ppl_increase) if max_ppl_increase is not None else float(max_ppl))
        probes[0]["within_budget"] = within(probes[0].get(metric))
        good, bad = 0.0, None
        if probes[0]["within_budget"]:
            if probe(lo, "lo"):
                good = lo
                if probe(hi, "hi"):
                    good, step = hi, hi - lo
                    while bad is None and good < max_sparsity - 1e-9:  # expand upward
                        nxt = round(min(max_sparsity, good + step), 6)
                        if probe(nxt, "expand"):
                            good = nxt
                        else:
                            bad = nxt
                else:
                    bad = hi
            else:
                bad = lo  # narrow: the answer lies in [0, lo)
            while bad is not None and bad - good > tol:
                mid = round((good + bad) / 2, 6)
                if probe(mid, "bisect"):
                    good = mid
                else:
                    bad = mid
            best = good
        else:
            best = None
            logger.warning("Even the dense model (%s %.3f) is over the budget %.3f.", metric, probes[0].get(metric),
                           budget[0])
    finally:
        bar.close()
        if runner is not None:
            runner.restore()

    converged = best is not None and (bad is None or bad - best <= tol)
    best_row = next((p for p in probes if p["sparsity"] == best), None) if best is not None else None
    if best == 0.0:
        logger.warning("No probed sparsity above 0 stays within the budget (perplexity %.3f); the bracket "
                       "is [0, %s].", budget[0], bad)
    result = {
        "method": method,
        "pattern": "unstructured",
        "sparsity": best,
        "perplexity": best_row["perplexity"] if best_row else None,
        "dense_perplexity": dense_ppl,
        "budget_ppl": budget[0] if metric == "perplexity" else None,
        "max_ppl_increase": max_ppl_increase,
        "max_ppl": max_ppl,
        "budget_metric": metric,
        **({"zeroshot_acc": best_row.get("zeroshot_acc") if best_row else None,
            "dense_zeroshot_acc": probes[0]["zeroshot_acc"], "budget_acc": budget[0], "max_acc_drop": max_acc_drop}
           if metric == "zeroshot_acc" else {}),
        "first_over_budget": bad,
        "tol": tol,
        "lo": lo,
        "hi": hi,
        "converged": converged,
        "evaluations": sum(not p["reused"] for p in probes),
        "seconds": time.perf_counter() - start,
        "settings": settings,
        "probes": [{k: v for k, v in p.items() if k != "settings"} for p in probes],
    }
    if out is not None:
        atomic_write(out / "search.json", json.dumps(result, indent=2, default=str) + "\n")
    return result
