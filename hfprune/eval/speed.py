"""Inference speed of several models measured side by side: prefill and decode throughput, request
latency at given batch sizes, peak memory.

The models are loaded into one process and measured round-robin (repetition 1 of every model and
batch size, then repetition 2, ...), after warm-up runs, and the median over repetitions is
reported, so drift of the machine (other jobs, clock scaling, a warming cache) hits every model
alike. One run at batch size ``b`` is one request: a prefill forward of ``b x prompt_tokens``
random token ids (the same ids for every model) with the KV cache on, then ``new_tokens`` greedy
decode steps of one token each; ``latency_s`` is prefill + decode.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the run (weights included). On CPU
the process holds every model at once, so the figure is the model's parameter and buffer bytes
plus the growth of the resident set (``/proc/self/statm``, sampled every 5 ms by a thread) during
the run, after ``malloc_trim(0)`` returned freed memory to the system (glibc; elsewhere the growth
may read low when freed memory is reused). ``memory_method`` in the result says which one was used.

Works for any causal LM :func:`hfprune.models.load_model` loads: dense checkpoints, structured
(smaller) outputs and ``format="sparse"`` checkpoints (decompressed on load, so they run exactly as
fast as their dense equivalent: zeros do not skip work in a dense matmul).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from hfprune.arch import max_positions
from hfprune.models import ALIASES, load_model, resolve_model_path
from hfprune.report import zero_counts

logger = logging.getLogger(__name__)

__all__ = ["SpeedConfig", "benchmark_speed", "check_models"]


@dataclass
class SpeedConfig:
    """What :func:`benchmark_speed` measures (``hfprune bench`` has one flag per field)."""

    models: list[str] = field(default_factory=list, metadata={
        "help": "Model to measure: local checkpoint folder, Hub id or alias (smollm2-135m); repeat for each model."})
    prompt_tokens: int = field(default=128, metadata={"help": "Prompt length of a request (prefill tokens per row)."})
    new_tokens: int = field(default=32, metadata={"help": "Tokens generated per request (greedy decode steps)."})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8], metadata={
        "help": "Batch sizes to measure (rows per request)."})
    repetitions: int = field(default=5, metadata={"help": "Timed runs per model and batch size (median reported)."})
    warmup: int = field(default=1, metadata={"help": "Untimed runs per model and batch size before timing."})
    dtype: str | None = field(default=None, metadata={
        "help": "auto (each checkpoint's), float32, bfloat16 or float16."})
    device: str = field(default="auto", metadata={
        "help": "auto (cuda when available, else cpu), cpu, cuda, cuda:1 ..."})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (default: torch's choice)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random prompt token ids."})

    def __post_init__(self):
        problems = []
        for name in ("prompt_tokens", "new_tokens", "repetitions"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        if int(self.warmup) < 0:
            problems.append(f"warmup must be 0 or more (got {self.warmup})")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            problems.append(f"batch_sizes must be positive integers (got {self.batch_sizes})")
        if self.threads is not None and int(self.threads) < 1:
            problems.append(f"threads must be at least 1 (got {self.threads})")
        if problems:
            raise ValueError("Bad speed benchmark settings: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# input checks (cheap: configs only, before any weights are read)
# --------------------------------------------------------------------------------------------

def check_models(config: SpeedConfig) -> list[Any]:
    """Resolve every model and read its ``config.json``; returns the configs. Raises a
    ``ValueError`` naming the model and the fix when one cannot be used, before anything heavy runs."""
    from transformers import AutoConfig

    if not config.models:
        raise ValueError("Name at least one model to measure: --model A [--model B ...] (folders, Hub ids or aliases).")
    configs = []
    for name in config.models:
        looks_local = os.path.isabs(name) or name.startswith(".") or os.path.exists(name) or name.count("/") > 1
        if name not in ALIASES and looks_local and not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(f"--model {name}: no config.json there. Pass a checkpoint folder (as written by "
                             f"save_pretrained / hfprune prune), a Hub id, or an alias ({', '.join(ALIASES)}).")
        try:
            cfg = AutoConfig.from_pretrained(resolve_model_path(name))
        except OSError as err:
            raise ValueError(f"--model {name}: cannot read its config ({str(err).splitlines()[0]}). Pass a local "
                             f"checkpoint folder, a reachable Hub id, or an alias ({', '.join(ALIASES)}).") from err
        limit = max_positions(cfg)
        if limit is not None and config.prompt_tokens + config.new_tokens > limit:
            raise ValueError(f"--model {name}: prompt_tokens + new_tokens = "
                             f"{config.prompt_tokens + config.new_tokens} exceeds the {limit} positions it covers; "
                             f"use a shorter prompt or fewer new tokens.")
        configs.append(cfg)
    return configs


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use --device cpu (or auto).")
    return dev


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------

def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class _PeakRSS:
    """Highest resident set size seen while the ``with`` body runs (a sampling thread)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() or 0)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start = self.peak = _rss_bytes() or 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() or 0)

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start)


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------
# one request
# --------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _request(model, ids: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one request: a cached prefill of ``ids``, then
    ``new_tokens`` greedy steps of one token."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, cache=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return prefill, time.perf_counter() - start


def _measure(model, ids, new_tokens, device) -> dict[str, float]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        prefill, decode = _request(model, ids, new_tokens, device)
        return {"prefill_s": prefill, "decode_s": decode, "peak_memory_bytes": torch.cuda.max_memory_allocated(device)}
    _malloc_trim()
    with _PeakRSS() as rss:
        prefill, decode = _request(model, ids, new_tokens, device)
    return {"prefill_s": prefill, "decode_s": decode, "peak_memory_bytes": _model_bytes(model) + rss.growth}


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------

def _describe(model) -> dict[str, Any]:
    """Parameters (tied weights once) and the zero fraction of the decoder Linear weights."""
    seen, params = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            params += p.numel()
    linear = [(n + ".weight", m.weight) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    zeros = zero_counts(linear)["sparsity"] if linear else 0.0
    return {"parameters": params, "parameter_bytes": _model_bytes(model), "linear_zero_fraction": round(zeros, 4)}


_CUDA_MEMORY = "cuda: torch.cuda.max_memory_allocated over the run (weights included)"
_CPU_MEMORY = ("cpu: parameter+buffer bytes + peak resident-set growth during the run (/proc/self/statm sampled "
               "every 5 ms, after malloc_trim)")


def benchmark_speed(config: SpeedConfig, *, models: list | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure every model of ``config.models`` (or the already loaded ``models``, named by
    ``config.models``) round-robin; returns a JSON-ready dict (see the module docstring).

    ``result["models"]`` holds one entry per model: ``name``, ``parameters``, ``parameter_bytes``,
    ``linear_zero_fraction``, and per batch size (``"batch_1"`` ...) the medians ``prefill_s``,
    ``decode_s``, ``latency_s``, ``prefill_tokens_per_s``, ``decode_tokens_per_s``,
    ``peak_memory_bytes`` and the raw ``runs``; ``speedup_vs_first`` compares decode throughput
    and latency with the first model.
    """
    device = _device(config.device)
    if models is None:
        check_models(config)
    elif len(models) != len(config.models):
        raise ValueError(f"{len(models)} models given but {len(config.models)} names in config.models.")
    if config.threads:
        torch.set_num_threads(int(config.threads))

    loaded = []
    for i, name in enumerate(config.models):
        if models is not None:
            model = models[i]
        else:
            logger.info("Loading %s", name)
            model = load_model(name, dtype=config.dtype)
        loaded.append(model.to(device).eval())
    vocab = min(m.get_input_embeddings().num_embeddings for m in loaded)
    if len({m.get_input_embeddings().num_embeddings for m in loaded}) > 1:
        logger.warning("The models have different vocabularies; prompts use token ids below %d for all.", vocab)
    gen = torch.Generator().manual_seed(config.seed)
    prompts = {b: torch.randint(0, vocab, (int(b), config.prompt_tokens), generator=gen).to(device)
               for b in config.batch_sizes}

    runs: dict[tuple[int, int], list[dict]] = {(i, b): [] for i in range(len(loaded)) for b in config.batch_sizes}
    total = (config.warmup + config.repetitions) * len(loaded) * len(config.batch_sizes)
    start = time.perf_counter()
    with tqdm(total=total, desc="hfprune bench", unit="run", disable=not progress) as bar:
        for rep in range(config.warmup + config.repetitions):   # round robin: drift hits every model alike
            for i, model in enumerate(loaded):
                for b in config.batch_sizes:
                    result = _measure(model, prompts[b], config.new_tokens, device)
                    if rep >= config.warmup:
                        runs[(i, b)].append(result)
                    bar.update()

    entries = []
    for i, (name, model) in enumerate(zip(config.models, loaded)):
        entry = {"name": name, **_describe(model)}
        for b in config.batch_sizes:
            rs = runs[(i, b)]
            prefill = statistics.median(r["prefill_s"] for r in rs)
            decode = statistics.median(r["decode_s"] for r in rs)
            latency = statistics.median(r["prefill_s"] + r["decode_s"] for r in rs)
            entry[f"batch_{b}"] = {
                "prefill_s": prefill, "decode_s": decode, "latency_s": latency,
                "prefill_tokens_per_s": b * config.prompt_tokens / prefill,
                "decode_tokens_per_s": b * config.new_tokens / decode,
                "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rs),
                "runs": [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rs],
            }
        entries.append(entry)
    first = entries[0]
    for entry in entries:
        entry["speedup_vs_first"] = {
            f"batch_{b}": {"decode_tokens_per_s": entry[f"batch_{b}"]["decode_tokens_per_s"]
                           / first[f"batch_{b}"]["decode_tokens_per_s"],
                           "latency": first[f"batch_{b}"]["latency_s"] / entry[f"batch_{b}"]["latency_s"]}
            for b in config.batch_sizes}
        entry["parameters_vs_first"] = entry["parameters"] / first["parameters"]
    return {
        "config": config.to_dict(),
        "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__,
        "memory_method": _CUDA_MEMORY if device.type == "cuda" else _CPU_MEMORY,
        "order": "round-robin over repetitions x models x batch sizes, after warm-up; medians",
        "seconds": round(time.perf_counter() - start, 2),
        "models": entries,
    }
