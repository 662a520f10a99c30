"""Shared pieces of the benchmark scripts (protocol constants, subprocess runner, JSON output)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIME = "/usr/bin/time"  # GNU time: -v prints the peak RSS

PROTOCOL = {
    "model": "smollm2-135m",
    "dtype": "float32",
    "calibration": "c4",
    "nsamples": 64,
    "seqlen": 512,
    "seed": 0,
    "eval_dataset": "wikitext2",
    "eval_seqlen": 2048,
    "max_windows": 32,
}


def machine() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform()}


def unique_params(model) -> int:
    """Parameters counted once each (tied embeddings are one tensor)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def run_child(script: str, args: list[str], out_json: Path, python: str | None = None) -> dict:
    """Run ``script`` in a fresh process (clean peak RSS) and read the JSON it writes."""
    cmd = [python or sys.executable, script, *args, "--child-json", str(out_json)]
    proc = subprocess.run(cmd, text=True, stdout=sys.stdout, stderr=sys.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return json.loads(out_json.read_text())


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def add_protocol_args(parser: argparse.ArgumentParser, runs: str, output: str, runs_help: str | None = None) -> None:
    """The flags both one-shot comparisons share: runs, calibration size, eval windows, timing, output."""
    parser.add_argument("--runs", default=runs, help=runs_help)
    parser.add_argument("--nsamples", type=int, default=PROTOCOL["nsamples"])
    parser.add_argument("--seqlen", type=int, default=PROTOCOL["seqlen"])
    parser.add_argument("--max-windows", type=int, default=PROTOCOL["max_windows"])
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--forward-ref", action="store_true",
                        help="time a plain forward (batch 8) in each prune run, right before pruning")
    parser.add_argument("--output", default=output)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)


def protocol_result(args, machine_info: dict) -> tuple[dict, list[str]]:
    """The JSON skeleton for a comparison run, and the flags each child process gets."""
    result = {"protocol": {**PROTOCOL, "nsamples": args.nsamples, "seqlen": args.seqlen, "max_windows": args.max_windows},
              "machine": machine_info, "command": " ".join(sys.argv), "runs": {}}
    passthrough = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--max-windows", str(args.max_windows)]
    if args.skip_eval:
        passthrough.append("--skip-eval")
    if args.forward_ref:
        passthrough.append("--forward-ref")
    return result, passthrough


@functools.lru_cache(maxsize=None)
def git_commit() -> str | None:
    """The checkout's commit when the run started (``-dirty``: hfprune/ has uncommitted changes)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "hfprune"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


class LoadSampler:
    """Samples the 1-min load average every ``every`` seconds in a thread (what ../shared/tools/quiet does)."""

    def __init__(self, every: float = 5.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> float | None:
        try:
            return float(Path("/proc/loadavg").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _run(self):
        while True:
            value = self.read()
            if value is not None:
                self.samples.append(value)
            if self._stop.wait(self.every):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        value = self.read()
        if value is not None:
            self.samples.append(value)

    def summary(self) -> dict:
        cores = os.cpu_count() or 1
        peak = max(self.samples) if self.samples else None
        return {"max_1min": peak, "mean_1min": sum(self.samples) / len(self.samples) if self.samples else None,
                "samples": len(self.samples), "every_s": self.every, "cores": cores,
                # the run itself accounts for up to `cores` of the load; more means something else ran beside it
                "quiet": None if peak is None else peak <= cores + 0.5}


def timed(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd`` in a fresh process under ``TIME -v`` (output to ``log``): its wall seconds, peak RSS
    (MiB, "Maximum resident set size") and the 1-min load during it (:class:`LoadSampler`); raises on failure."""
    with LoadSampler() as load, open(log, "w") as fh:
        start = time.perf_counter()
        res = subprocess.run([TIME, "-v", *cmd], env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}); log: {log}\n{text[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"wall_s": wall, "peak_rss_mb": int(rss.group(1)) / 1024 if rss else None, "load": load.summary()}
