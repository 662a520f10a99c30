"""Shared pieces of the benchmark scripts (protocol constants, subprocess runner, JSON output)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

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
