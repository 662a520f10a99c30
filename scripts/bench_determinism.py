"""How much do masks and perplexity depend on the process and thread count? (issue 15, item 14)

SparseGPT 50 % on SmolLM2-135M (calibration c4 ``--nsamples`` x 512 seed 0, ``--batch-size 4``), pruned
four ways, each in fresh processes:

* ``1p-2t``: one process, 2 threads;      * ``1p-1t``: one process, 1 thread;
* ``2p-1t``: ``accelerate launch --cpu --num_processes 2``, 1 thread per process;
* ``auto-2t``: one process, 2 threads, the automatic batch (the default).

For every pair: the number of target-weight positions whose mask differs, and whether all
saved tensors are bit-identical; for every run: WikiText-2 perplexity (seqlen 2048, first 32
windows) through ``hfprune eval``. Writes ``docs/results/determinism.json``.

    .venv/bin/python scripts/bench_determinism.py [--output docs/results/determinism.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench_common import PROTOCOL, machine, write_json

BIN = Path(sys.executable).parent
RUNS = {  # name: (processes, threads, batch size or None for the automatic one)
    "1p-2t": (1, 2, 4),
    "1p-1t": (1, 1, 4),
    "2p-1t": (2, 1, 4),
    "auto-2t": (1, 2, None),
}


def prune(name: str, out: Path, processes: int, threads: int, batch: int | None, sparsity: float,
          nsamples: int) -> float:
    args = ["prune", "--model", PROTOCOL["model"], "--method", "sparsegpt", "--sparsity", str(sparsity),
            "--calibration", PROTOCOL["calibration"], "--nsamples", str(nsamples), "--seqlen",
            str(PROTOCOL["seqlen"]), "--seed", str(PROTOCOL["seed"]), "--dtype", PROTOCOL["dtype"],
            "--output", str(out), "--overwrite"]
    if batch:
        args += ["--batch-size", str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    if processes == 1:
        cmd = [str(BIN / "hfprune"), *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", str(processes), "--num_machines", "1",
               "--num_cpu_threads_per_process", str(threads), "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(BIN / "hfprune"), *args]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def evaluate(out: Path, max_windows: int) -> float:
    res = subprocess.run([str(BIN / "hfprune"), "eval", "--model", str(out), "--max-windows", str(max_windows),
                          "--seqlen", str(PROTOCOL["eval_seqlen"]), "--json"], check=True, capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(res.stdout.strip().splitlines()[-1])["perplexity"]


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=PROTOCOL["nsamples"])
    parser.add_argument("--max-windows", type=int, default=PROTOCOL["max_windows"])
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--workdir", default=None, help="Keep the pruned checkpoints here (default: a temp folder).")
    parser.add_argument("--output", default="docs/results/determinism.json")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hfprune-determinism-"))
    names = [n for n in args.runs.split(",") if n]
    rows = {}
    for name in names:
        processes, threads, batch = RUNS[name]
        out = work / name
        seconds = prune(name, out, processes, threads, batch, args.sparsity, args.nsamples)
        ppl = evaluate(out, args.max_windows)
        rows[name] = {"processes": processes, "threads_per_process": threads, "batch_size": batch or "auto",
                      "prune_s": round(seconds, 1), "perplexity": ppl}
        print(f"{name}: {seconds:.0f} s, perplexity {ppl:.4f}", flush=True)
    pairs = []
    loaded = {n: tensors(work / n) for n in names}
    for a, b in itertools.combinations(names, 2):
        ta, tb = loaded[a], loaded[b]
        targets = [k for k in ta if ".layers." in k and k.endswith("proj.weight")]
        differ = sum(int(((ta[k] == 0) != (tb[k] == 0)).sum()) for k in targets)
        total = sum(ta[k].numel() for k in targets)
        identical = set(ta) == set(tb) and all(ta[k].equal(tb[k]) for k in ta)
        pairs.append({"a": a, "b": b, "mask_positions_differ": differ, "positions": total,
                      "tensors_bit_identical": identical})
        print(f"{a} vs {b}: masks differ at {differ:,} of {total:,}; bit-identical: {identical}", flush=True)
    ppls = [r["perplexity"] for r in rows.values()]
    write_json(Path(args.output), {
        "protocol": {**PROTOCOL, "method": "sparsegpt", "sparsity": args.sparsity, "nsamples": args.nsamples,
                     "max_windows": args.max_windows},
        "machine": machine(), "runs": rows, "pairs": pairs,
        "perplexity_spread": {"min": min(ppls), "max": max(ppls), "relative": (max(ppls) - min(ppls)) / min(ppls)},
        "command": "python scripts/bench_determinism.py " + " ".join(sys.argv[1:]),
    })


if __name__ == "__main__":
    main()
