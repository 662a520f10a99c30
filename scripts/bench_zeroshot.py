"""Zero-shot benchmarks of dense and pruned SmolLM2-135M through lm-evaluation-harness (issue 18).

Every row comes from ``hfprune eval --tasks ... --output bench_out/zeroshot/NAME.json`` (the CLI's own
code path: hfprune.load_model, then lm-eval's HFLM on the in-memory model and the task configs in
hfprune/eval/tasks). ``--run NAME=DIR`` runs that command (one model at a time, in this process);
rows already in bench_out/zeroshot/ are collected. ``--lm-eval-results FILE`` compares the ``dense``
row with a results_*.json written by the ``lm_eval`` command line on the same configs::

    lm_eval --model hf --model_args pretrained=DIR --device cpu --include_path hfprune/eval/tasks \\
        --tasks piqa,arc_easy,... --limit 20 --batch_size 16 --output_path bench_out/lmeval_cli

and records, per task and metric, both values at the digits lm_eval prints (4 decimals) and whether
they agree. Writes docs/results/zeroshot_harness.json, which scripts/bench_report.py renders.

    .venv/bin/python scripts/bench_zeroshot.py --run dense=~/.cache/hfprune/smollm2-135m --limit 20
    .venv/bin/python scripts/bench_zeroshot.py --lm-eval-results bench_out/lmeval_cli/*/results_*.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "bench_out" / "zeroshot"
OUT = ROOT / "docs" / "results" / "zeroshot_harness.json"
NINE = "piqa,arc_easy,arc_challenge,winogrande,boolq,openbookqa,rte,lambada_openai,hellaswag"
ORDER = ["dense", "wanda-50", "sparsegpt-50", "wanda-2of4", "sparsegpt-2of4"]
# How each pruned model was made (the brief's protocol: calibration c4 64 x 512, seed 0).
PRUNE = {
    "wanda-50": "hfprune prune --model smollm2-135m --method wanda --sparsity 0.5",
    "sparsegpt-50": "hfprune prune --model smollm2-135m --method sparsegpt --sparsity 0.5",
    "wanda-2of4": "hfprune prune --model smollm2-135m --method wanda --sparsity 0.5 --pattern 2:4",
    "sparsegpt-2of4": "hfprune prune --model smollm2-135m --method sparsegpt --sparsity 0.5 --pattern 2:4",
}
PRUNE_TAIL = " --calibration c4 --nsamples 64 --seqlen 512 --seed 0 --output DIR"


def run_one(name: str, model: str, tasks: str, limit, batch_size: int) -> dict:
    from hfprune.cli import main

    ROWS.mkdir(parents=True, exist_ok=True)
    out = ROWS / f"{name}.json"
    argv = ["eval", "--model", os.path.expanduser(model), "--tasks", tasks, "--batch-size", str(batch_size),
            "--output", str(out), "--overwrite"] + (["--limit", str(limit)] if limit else [])
    start = time.perf_counter()
    if main(argv) != 0:
        raise SystemExit(f"hfprune {' '.join(argv)} failed")
    data = json.loads(out.read_text())
    data["command"] = "hfprune " + " ".join(shlex.quote(a) for a in argv)
    data["wall_seconds"] = time.perf_counter() - start  # model load + evaluation
    out.write_text(json.dumps(data, indent=2) + "\n")
    return data


def compare_with_lm_eval(row: dict, path: Path) -> dict:
    """Per task and metric: (hfprune, lm_eval) at lm_eval's printed precision, and whether they agree."""
    cli = json.loads(path.read_text())
    checks, equal = {}, True
    for task, metrics in row["zeroshot"]["tasks"].items():
        theirs = cli["results"].get(task, {})
        for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "perplexity", "perplexity_stderr"):
            if metric not in metrics and f"{metric},none" not in theirs:
                continue
            a, b = metrics.get(metric), theirs.get(f"{metric},none")
            same = a is not None and b is not None and f"{a:.4f}" == f"{b:.4f}"
            equal &= same
            checks[f"{task}/{metric}"] = {"hfprune": a, "lm_eval": b, "printed_equal": same}
        n = (cli.get("n-samples") or {}).get(task, {}).get("effective")
        if n != metrics.get("n"):
            equal = False
            checks[f"{task}/n"] = {"hfprune": metrics.get("n"), "lm_eval": n, "printed_equal": False}
    return {"lm_eval_results": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
            "lm_eval_limit": cli.get("config", {}).get("limit"), "lm_eval_batch_size": cli.get("config", {}).get("batch_size"),
            "lm_eval_seconds": float(cli.get("total_evaluation_time_seconds", 0) or 0),
            "all_equal": equal, "checks": checks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], metavar="NAME=DIR", help="Evaluate this model now.")
    ap.add_argument("--tasks", default=NINE)
    ap.add_argument("--limit", type=int, default=None, help="First N documents per task (default: full splits).")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lm-eval-results", type=Path, help="results_*.json of the lm_eval CLI for the dense model.")
    ap.add_argument("--lm-eval-command", help="The lm_eval command that wrote --lm-eval-results (recorded).")
    ap.add_argument("--note", help="A note printed under the table (e.g. why rows use --limit).")
    args = ap.parse_args()
    for spec in args.run:
        name, _, model = spec.partition("=")
        run_one(name, model, args.tasks, args.limit, args.batch_size)
    rows = {}
    for path in sorted(ROWS.glob("*.json")):
        rows[path.stem] = json.loads(path.read_text())
    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    result = {
        "script": "scripts/bench_zeroshot.py",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "prune_commands": {k: v + PRUNE_TAIL for k, v in PRUNE.items()},
        "rows": {k: rows[k] for k in sorted(rows, key=lambda k: (ORDER.index(k) if k in ORDER else 99, k))},
        "missing": [k for k in ORDER if k not in rows],
        "lm_eval_cli_check": previous.get("lm_eval_cli_check"),
        "note": args.note if args.note is not None else previous.get("note"),
    }
    if args.lm_eval_results:
        if "dense" not in rows:
            raise SystemExit("No dense row yet: run --run dense=DIR first.")
        result["lm_eval_cli_check"] = compare_with_lm_eval(rows["dense"], args.lm_eval_results.resolve())
        check = result["lm_eval_cli_check"]
        check["lm_eval_command"] = args.lm_eval_command
        for key, c in check["checks"].items():
            print(f"{key:<32} hfprune {c['hfprune']!s:<22} lm_eval {c['lm_eval']!s:<22} "
                  f"{'equal' if c['printed_equal'] else 'DIFFERENT'}")
        print("all equal at 4 decimals:", check["all_equal"])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)} ({len(rows)} rows; missing: {', '.join(result['missing']) or 'none'})")


if __name__ == "__main__":
    main()
