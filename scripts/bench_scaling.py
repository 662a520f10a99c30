"""How the cost of `hfprune prune --low-memory` grows with the model: time per parameter and peak RSS.

Random-weight Llama-shaped bf16 checkpoints of about 0.1B, 0.5B, 1.5B and 3B parameters (the shapes
and the cached, 500 MB-sharded checkpoints of scripts/bench_memory.py, made once on disk), pruned at
50 % with Wanda (all sizes) and SparseGPT (default: up to 1.5B), calibration c4 16 x 256. Every
prune is a fresh process measured with ``/usr/bin/time -v`` (peak RSS = its "Maximum resident set
size"; time = the report's prune_seconds and the process's wall time). Writes
docs/results/scaling.json and docs/img/scaling.png (time per parameter and peak RSS against the
parameter count).

    python scripts/bench_scaling.py                                # the full table (hours on 2 cores)
    python scripts/bench_scaling.py --sizes 0.1b --methods wanda   # one row, to check the script
    python scripts/bench_scaling.py --llmc-python .venv-llmc/bin/python   # + llm-compressor side by side

``--llmc-python`` runs the same prune with llm-compressor's ``oneshot`` (sequential pipeline, decoder
projections) in that interpreter's venv (see scripts/bench_llmcompressor.py for making it), on the
same checkpoint and token windows, also in its own measured process. Run it on a quiet machine:
the times are only comparable when nothing else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import _bench_common  # noqa: E402  (timed, git_commit; imports no torch)
import bench_memory  # noqa: E402  (shapes, VOCAB, the cached random checkpoints; imports no torch)

NSAMPLES, SEQLEN = 16, 256
TIME = _bench_common.TIME


def n_params(size: str) -> int:
    h = bench_memory.SHAPES[size][0]
    n = bench_memory.SHAPES[size][2]
    return n * bench_memory.block_params(size) + bench_memory.VOCAB * h + h  # tied embeddings


def timed(cmd: list[str], env: dict, log: Path) -> dict:
    """``_bench_common.timed`` with the row keys of this table: wall seconds, peak RSS (MiB), the highest 1-min load
    during the prune and whether it stayed quiet (as ../shared/tools/quiet judges it)."""
    row = _bench_common.timed(cmd, log, env=env)
    load = row.pop("load")
    return {**row, "load_max": load["max_1min"], "quiet": bool(load["quiet"])}


def env_for(python_path: str | None = None) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO)}


def prune_hfprune(model: Path, method: str, out: Path, log: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "hfprune.cli", "prune", "--model", str(model), "--method", method,
           "--sparsity", "0.5", "--calibration", "c4", "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN),
           "--low-memory", "--output", str(out)]
    row = timed(cmd, env_for(), log)
    report = json.loads((out / "pruning_report.json").read_text())
    row.update(prune_s=report["prune_seconds"], report_peak_rss_mb=report["peak_rss_mb"],
               sparsity=report["sparsity"], batch_size=(report.get("calibration") or {}).get("batch_size"),
               command=" ".join(["hfprune", *cmd[3:]]))
    shutil.rmtree(out, ignore_errors=True)
    return row


def prune_llmc(python: str, model: Path, method: str, work: Path, log: Path) -> dict:
    out_json = work / f"llmc-{model.name}-{method}.json"
    cmd = [python, __file__, "--llmc-child", str(model), "--methods", method, "--output", str(out_json)]
    row = timed(cmd, env_for(), log)
    row.update(json.loads(out_json.read_text()))
    return row


def llmc_child(model: str, method: str, output: str) -> None:
    """Inside the llm-compressor venv: prune ``model`` in memory with ``oneshot`` and report."""
    import datasets
    import llmcompressor
    import torch
    from bench_llmcompressor import oneshot_sparsity
    from llmcompressor.modifiers import pruning
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfprune.config import CalibrationConfig
    from hfprune.core.calibration import get_calibration_ids

    tok = AutoTokenizer.from_pretrained(model)
    ids = get_calibration_ids(CalibrationConfig(dataset="c4", nsamples=NSAMPLES, seqlen=SEQLEN, seed=0), tok)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    modifier = {"wanda": pruning.WandaPruningModifier, "sparsegpt": pruning.SparseGPTModifier}[method]
    recipe = modifier(targets=["re:.*layers.*proj$"], sparsity=0.5, mask_structure="0:0")
    seconds, sparsity = oneshot_sparsity(net, ds, recipe, NSAMPLES, SEQLEN)
    Path(output).write_text(json.dumps({"prune_s": seconds, "sparsity": sparsity,
                                        "llmcompressor": llmcompressor.__version__}))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["tool"], r["method"]) for r in rows}):
        pts = sorted((r for r in rows if (r["tool"], r["method"]) == key), key=lambda r: r["params"])
        xs = [r["params"] / 1e9 for r in pts]
        style = "o-" if key[0] == "hfprune" else "s--"
        ax_t.plot(xs, [r["prune_ns_per_param"] for r in pts], style, label=f"{key[0]} {key[1]}")
        ax_m.plot(xs, [r["peak_rss_mb"] for r in pts], style, label=f"{key[0]} {key[1]}")
    ax_t.set(xlabel="parameters (billions)", ylabel="prune time per parameter (ns)", xscale="log",
             title=f"50 %, c4 {NSAMPLES} x {SEQLEN}, bf16")
    ax_m.set(xlabel="parameters (billions)", ylabel="peak RSS (MiB)", xscale="log", title="peak RSS (/usr/bin/time -v)")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summary(rows: list[dict]) -> dict:
    """The growth the benchmark exists to watch: time per parameter and RSS from 0.5B to the largest size."""
    out = {}
    for method in sorted({r["method"] for r in rows if r["tool"] == "hfprune"}):
        by = {r["size"]: r for r in rows if r["tool"] == "hfprune" and r["method"] == method}
        if "0.5b" in by and len(by) > 1:
            top = max(by.values(), key=lambda r: r["params"])
            out[method] = {"largest": top["size"],
                           "time_per_param_ratio_to_0.5b": top["prune_ns_per_param"] / by["0.5b"]["prune_ns_per_param"],
                           "peak_rss_ratio_to_0.5b": top["peak_rss_mb"] / by["0.5b"]["peak_rss_mb"]}
        theirs = {r["size"]: r for r in rows if r["tool"] == "llm-compressor" and r["method"] == method}
        both = sorted(set(by) & set(theirs), key=lambda s: by[s]["params"])
        if both:
            out.setdefault(method, {})["peak_rss_vs_llmcompressor"] = {
                s: round(by[s]["peak_rss_mb"] / theirs[s]["peak_rss_mb"], 3) for s in both}
            out[method]["prune_time_vs_llmcompressor"] = {
                s: round(by[s]["prune_s"] / theirs[s]["prune_s"], 3) for s in both}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.1b,0.5b,1.5b,3b", help=f"Of {', '.join(bench_memory.SHAPES)}.")
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--sparsegpt-max", default="1.5b", help="Largest size SparseGPT runs at (its solver is O(width^3)).")
    ap.add_argument("--llmc-python", help="Python of a venv with llm-compressor: run the same prunes with it too.")
    ap.add_argument("--work", default=str(REPO / "bench_out" / "scaling"))
    ap.add_argument("--output", default=str(REPO / "docs" / "results" / "scaling.json"))
    ap.add_argument("--plot", default=str(REPO / "docs" / "img" / "scaling.png"))
    ap.add_argument("--restart", action="store_true", help="Drop the rows already in --output instead of resuming.")
    ap.add_argument("--llmc-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.llmc_child:
        llmc_child(args.llmc_child, args.methods, args.output)
        return 0
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in bench_memory.SHAPES]
    if unknown:
        raise SystemExit(f"Unknown size(s) {unknown}: choose from {', '.join(bench_memory.SHAPES)}.")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.llmc_python and not Path(args.llmc_python).is_file():
        raise SystemExit(f"--llmc-python {args.llmc_python} does not exist.")
    if not Path(TIME).is_file():
        raise SystemExit(f"{TIME} is needed to measure each process's peak RSS (apt-get install time).")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.output)
    result = {"nsamples": NSAMPLES, "seqlen": SEQLEN, "dtype": "bfloat16", "sparsity": 0.5, "calibration": "c4",
              "mode": "hfprune: --low-memory; llm-compressor: oneshot, sequential pipeline, model in memory",
              "rss": "/usr/bin/time -v Maximum resident set size of the pruning process", "rows": []}
    if out.is_file() and not args.restart:  # resume: rows already measured are kept, not re-run
        result["rows"] = json.loads(out.read_text()).get("rows", [])
    done = {(r["size"], r["method"], r["tool"]) for r in result["rows"]}
    order = list(bench_memory.SHAPES)
    commit = _bench_common.git_commit()
    for size in sorted(sizes, key=order.index):
        model = Path(subprocess.run([sys.executable, str(HERE / "bench_memory.py"), "--build", size], check=True,
                                    capture_output=True, text=True, env=env_for()).stdout.strip().splitlines()[-1])
        params = n_params(size)
        for method in methods:
            if method == "sparsegpt" and order.index(size) > order.index(args.sparsegpt_max):
                continue
            runs = [("hfprune", lambda: prune_hfprune(model, method, work / f"out-{size}-{method}",
                                                      work / f"hfprune-{size}-{method}.log"))]
            if args.llmc_python:
                runs.append(("llm-compressor", lambda: prune_llmc(args.llmc_python, model, method, work,
                                                                  work / f"llmc-{size}-{method}.log")))
            for tool, run in runs:
                if (size, method, tool) in done:
                    continue
                row = {"size": size, "params": params, "method": method, "tool": tool, **run()}
                row["prune_ns_per_param"] = row["prune_s"] / params * 1e9
                row["commit"] = commit
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                result["summary"] = summary(result["rows"])
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result["rows"], Path(args.plot))
    print(f"wrote {out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
