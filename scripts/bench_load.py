"""Load time users feel: sparse checkpoints vs the same model's dense checkpoint, stock ``from_pretrained``.

SmolLM2-135M in bf16 is saved three ways: dense (stock layout), ``format="sparse"`` 2:4 (values +
N:M pattern codes) and ``format="sparse"`` 50 % unstructured (values + bitmask). The pruning is
magnitude (data-free): load time depends on the stored layout, not on how the zeros were chosen.
Every load is one fresh subprocess (``import hfprune`` first, not timed) that times

    AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)

with wall clock (``time.perf_counter``) and process CPU time (``time.process_time``, all threads; on
a shared machine it is the steadier of the two). The file cache is warm (every file read once, one
untimed load of each checkpoint), the checkpoints are loaded round-robin (dense, 2:4, 50 %, dense,
...) so machine drift hits all of them alike, and the medians over ``--reps`` loads are compared.
Target (issue 19): sparse / dense <= 2 for both sparse checkpoints. Each sparse checkpoint is also
reloaded once in this process and compared with the in-memory pruned model (must be bit-identical).

    .venv/bin/python scripts/bench_load.py                          # -> docs/results/load_time.json
    .venv/bin/python scripts/bench_load.py --reps 9 --keep bench_out/load_ckpts
    .venv/bin/python scripts/bench_load.py --reuse bench_out/load_ckpts   # time saved checkpoints again
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import machine, write_json  # noqa: E402

VARIANTS = {  # name: (pattern or None for dense, label)
    "dense": (None, "dense bf16, stock save_pretrained layout"),
    "sparse-2of4": ("2:4", "format='sparse', magnitude 2:4: bf16 values + N:M pattern codes"),
    "sparse-50": ("unstructured", "format='sparse', magnitude 50 % unstructured: bf16 values + bitmask"),
}
TARGET = 2.0


def _child(folder: str) -> None:
    """One timed load in this (fresh) process; prints one JSON line."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    import hfprune  # noqa: F401  (registers the hfprune-sparse loader)

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    wall, cpu = time.perf_counter(), time.process_time()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert getattr(model.config, "quantization_config", None) is None, "the loaded model is not dense"
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "threads": torch.get_num_threads()}))


def _time_load(folder: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"loading {folder} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _save_all(root: Path, model_name: str) -> dict:
    """Save the three checkpoints under ``root``; returns per-variant save facts."""
    import copy

    import torch

    import hfprune
    from hfprune.formats.sparse import load_sparse, sizes_report

    base = hfprune.load_model(model_name, dtype="bfloat16").eval()
    facts = {}
    for name, (pattern, _) in VARIANTS.items():
        folder = root / name
        if pattern is None:
            model, report, fmt = base, None, "dense"
        else:
            model = copy.deepcopy(base)
            report = hfprune.prune(model, None, hfprune.MagnitudeConfig(sparsity=0.5, pattern=pattern), progress=False)
            fmt = "sparse"
        start = time.perf_counter()
        hfprune.save_pretrained(model, folder, format=fmt, report=report)
        facts[name] = {"save_s": round(time.perf_counter() - start, 2),
                       "weights_bytes": sizes_report(folder)["weights_bytes"]}
        if pattern is not None:  # lossless: the reloaded weights are the pruned ones, bit for bit
            loaded = load_sparse(folder, dtype=torch.bfloat16)
            ref = model.state_dict()
            facts[name]["reload_bit_identical"] = all(torch.equal(t, ref[k]) for k, t in loaded.state_dict().items())
            del loaded, model
        print(f"saved {name}: {facts[name]}", flush=True)
    return facts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--reps", type=int, default=7, help="timed loads per checkpoint (median reported)")
    parser.add_argument("--output", default="docs/results/load_time.json")
    parser.add_argument("--keep", default=None, help="save the checkpoints in this folder (kept afterwards)")
    parser.add_argument("--reuse", default=None, help="time the checkpoints an earlier --keep saved there")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.reuse and not all((Path(args.reuse) / n / "config.json").is_file() for n in VARIANTS):
        parser.error(f"--reuse {args.reuse}: expected the folders {', '.join(VARIANTS)} from an earlier --keep run")

    started = time.perf_counter()
    tmp = None
    if args.reuse:
        root, facts = Path(args.reuse), {}
    else:
        if args.keep:
            root = Path(args.keep)
            if root.exists() and any(root.iterdir()):
                parser.error(f"--keep {root}: the folder is not empty; pass an empty or new folder")
            root.mkdir(parents=True, exist_ok=True)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="hfprune-bench-load-")
            root = Path(tmp.name)
        facts = _save_all(root, args.model)

    # warm file cache: read every file, then one untimed load of each checkpoint
    for path in root.rglob("*"):
        if path.is_file():
            path.read_bytes()
    for name in VARIANTS:
        _time_load(root / name)

    runs = {name: [] for name in VARIANTS}
    for rep in range(args.reps):
        for name in VARIANTS:  # round robin
            runs[name].append(_time_load(root / name))
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{n} {r[-1]['wall_s']:.2f}s" for n, r in runs.items()),
              flush=True)

    result = {
        "model": f"{args.model}, bfloat16",
        "load": "fresh subprocess per load; import hfprune (untimed), then stock "
                "AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16); warm file cache; checkpoints "
                "interleaved round-robin; median over reps",
        "pruning": "magnitude 50 % (2:4 and unstructured); load time depends on the stored layout only",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {**machine(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "loadavg_end": list(os.getloadavg())},
        "reps": args.reps,
        "target": f"sparse / dense median load time <= {TARGET}",
        "variants": {},
        "ratios": {},
    }
    for name, (pattern, label) in VARIANTS.items():
        walls = [r["wall_s"] for r in runs[name]]
        cpus = [r["cpu_s"] for r in runs[name]]
        result["variants"][name] = {
            "label": label, **facts.get(name, {}),
            "median_wall_s": round(statistics.median(walls), 3), "median_cpu_s": round(statistics.median(cpus), 3),
            "wall_s": [round(x, 3) for x in walls], "cpu_s": [round(x, 3) for x in cpus],
            "threads": runs[name][0]["threads"],
        }
    dense = result["variants"]["dense"]
    for name in VARIANTS:
        if name == "dense":
            continue
        v = result["variants"][name]
        wall = v["median_wall_s"] / dense["median_wall_s"]
        cpu = v["median_cpu_s"] / dense["median_cpu_s"]
        result["ratios"][name] = {"wall": round(wall, 3), "cpu": round(cpu, 3), "ok": wall <= TARGET}
    result["seconds_total"] = round(time.perf_counter() - started, 1)
    write_json(Path(args.output), result)
    for name, r in result["ratios"].items():
        print(f"{name}: {r['wall']:.2f}x dense wall, {r['cpu']:.2f}x dense CPU ({'ok' if r['ok'] else 'ABOVE'} "
              f"target {TARGET})")
    print(f"wrote {args.output}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if all(r["ok"] for r in result["ratios"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
