"""Shared pieces of the benchmark scripts (protocol constants, subprocess runner, JSON output)."""

from __future__ import annotations

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
