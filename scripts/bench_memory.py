"""Peak memory of streaming (--low-memory) pruning versus model size.

Builds random-weight Llama-shaped checkpoints of about 0.1 B, 0.5 B and 1.5 B parameters (bf16,
500 MB shards, vocab 49152 = the SmolLM2 tokenizer's; cached in ~/.cache/hfprune/bench_models),
prunes each with Wanda 50 % in streaming mode (16 x 256 tokens of c4, the calibration batch that
--low-memory picks by itself) in a fresh process, records peak RSS and time, checks that the 0.1 B
result equals the in-memory run with the same batch (checksum), and writes
bench_out/memory.json and docs/img/memory.png.

    .venv/bin/python scripts/bench_memory.py [--sizes 0.1b,0.5b,1.5b] [--multiprocess]

``--multiprocess`` also prunes SmolLM2-135M with 2 calibration processes
(``accelerate launch --cpu --num_processes 2``, gloo) and with 1, and checks
the masks and weights are bit-identical.

The driver itself never imports torch and builds / checksums in child processes: a child started
from a large parent inherits the parent's peak RSS in ``ru_maxrss`` (Linux keeps it across exec),
which would spoil the measurements.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("HFPRUNE_CACHE", Path.home() / ".cache" / "hfprune")) / "bench_models"

SHAPES = {  # hidden, intermediate, layers, heads, kv heads
    "0.1b": (768, 2048, 10, 12, 4),
    "0.5b": (1280, 3584, 24, 20, 4),
    "1.5b": (2048, 5632, 31, 32, 8),
    "3b": (2560, 6912, 40, 32, 8),  # scripts/bench_scaling.py (Wanda only)
}
VOCAB = 49152
NSAMPLES, SEQLEN = 16, 256


def _config(size):
    from transformers import LlamaConfig

    h, i, n, heads, kv = SHAPES[size]
    return LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, dtype="bfloat16")


def block_params(size) -> int:
    h, i, _n, heads, kv = SHAPES[size]
    hd = h // heads
    return 2 * h * h + 2 * h * kv * hd + 3 * h * i + 2 * h


def build(size) -> Path:
    """The cached random checkpoint of ``size`` (made once)."""
    import torch
    from gpu_check import random_llama  # the one random-Llama builder (imports torch: kept inside)

    import hfprune

    path = CACHE / f"llama-{size}"
    if (path / "config.json").is_file():
        return path
    model = random_llama(_config(size), torch.bfloat16, seed=0)
    model.tie_weights()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="500MB")
    hfprune.load_tokenizer("smollm2-135m").save_pretrained(tmp)
    tmp.rename(path)
    return path


def checksum(folder: Path) -> str:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                tensors[k] = f
    h = hashlib.sha256()
    for k in sorted(tensors):
        with safe_open(str(tensors[k]), framework="pt") as fh:
            t = fh.get_tensor(k)
        h.update(k.encode())
        h.update(t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def _child(*args: str) -> str:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    if res.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{res.stderr[-3000:]}")
    return res.stdout.strip().splitlines()[-1]


def run_prune(model: Path | str, out: Path, *extra: str, launcher: list[str] | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = (launcher or []) + [str(BIN / "hfprune"), "prune", "--model", str(model), "--method", "wanda",
                              "--sparsity", "0.5", "--calibration", "c4", "--nsamples", str(NSAMPLES),
                              "--seqlen", str(SEQLEN), "--output", str(out), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    report = json.loads((out / "pruning_report.json").read_text())
    return {"wall_s": wall, "prune_s": report["prune_seconds"], "peak_rss_mb": report["peak_rss_mb"],
            "sparsity": report["sparsity"], "batch_size": (report.get("calibration") or {}).get("batch_size")}


def plot(rows, est, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["params"] / 1e9 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["peak_rss_mb"] for r in rows], "o-", label="--low-memory peak RSS")
    ax.plot(xs, est, "s--", label="estimate: base + one block + activations")
    ax.plot(xs, [r["params"] * 2 / 2**20 for r in rows], ":", color="gray", label="whole model (bf16)")
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("MiB")
    ax.set_title(f"Wanda 50%, {NSAMPLES}x{SEQLEN} c4 tokens, streaming")
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.1b,0.5b,1.5b")
    ap.add_argument("--multiprocess", action="store_true", help="Also SmolLM2-135M with 2 processes vs 1.")
    ap.add_argument("--work", default=str(REPO / "bench_out" / "memory_runs"))
    ap.add_argument("--build", help=argparse.SUPPRESS)
    ap.add_argument("--checksum", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        print(build(args.build))
        return 0
    if args.checksum:
        print(checksum(Path(args.checksum)))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {"nsamples": NSAMPLES, "seqlen": SEQLEN, "batch_size": "auto (--low-memory)", "models": []}
    contention = subprocess.run(["pgrep", "-f", "bench_(oneshot|compare|size|structured|llmcompressor)"],
                                capture_output=True, text=True).stdout.split()
    result["other_benchmarks_running"] = len(contention)
    for size in args.sizes.split(","):
        t0 = time.perf_counter()
        path = Path(_child("--build", size))
        cfg = json.loads((path / "config.json").read_text())
        h, i, n, _heads, _kv = SHAPES[size]
        n_params = n * block_params(size) + VOCAB * h + h
        row = {"size": size, "params": n_params, "build_s": time.perf_counter() - t0,
               "block_mb": block_params(size) * 2 / 2**20,
               "activations_mb": NSAMPLES * SEQLEN * h * 2 / 2**20,
               "hidden": cfg["hidden_size"], "layers": cfg["num_hidden_layers"]}
        out = work / f"{size}-low-memory"
        # --low-memory picks its own calibration batch (block working memory <= the activations).
        row.update(run_prune(path, out, "--low-memory"))
        row["checksum"] = _child("--checksum", str(out))
        if size == "0.1b":
            ref = run_prune(path, work / f"{size}-in-memory", "--batch-size", str(row["batch_size"]))
            row["in_memory"] = {**ref, "checksum": _child("--checksum", str(work / f"{size}-in-memory"))}
            row["same_as_in_memory"] = row["in_memory"]["checksum"] == row["checksum"]
        result["models"].append(row)
        print(json.dumps(row), flush=True)
    rows = result["models"]
    if rows:
        base = rows[0]["peak_rss_mb"] - rows[0]["block_mb"] - rows[0]["activations_mb"]
        est = [base + r["block_mb"] + r["activations_mb"] for r in rows]
        for r, e in zip(rows, est):
            r["estimate_mb"] = e
        result["growth_mb"] = rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]
        result["allowed_growth_mb"] = rows[-1]["block_mb"] + rows[-1]["activations_mb"]
        plot(rows, est, REPO / "docs" / "img" / "memory.png")
    if args.multiprocess:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ["OMP_NUM_THREADS"] = "1"
        mp = {"model": "smollm2-135m", "batch_size": 2}
        one = run_prune("smollm2-135m", work / "smollm2-1proc", "--batch-size", "2")
        two = run_prune("smollm2-135m", work / "smollm2-2proc", "--batch-size", "2",
                        launcher=[str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "2",
                                  "--num_cpu_threads_per_process", "1",
                                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                  "--main_process_port", str(port)])
        mp.update(one_process=one, two_processes=two,
                  identical=_child("--checksum", str(work / "smollm2-1proc"))
                  == _child("--checksum", str(work / "smollm2-2proc")))
        result["multiprocess"] = mp
        print(json.dumps(mp), flush=True)
    out = REPO / "bench_out" / "memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
