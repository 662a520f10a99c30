"""Resumable full-split zero-shot benchmark of dense and pruned SmolLM2-135M (issue 30).

One row per (model, task), written to ``--output`` (atomically, the whole file replaced) as soon as
that task is scored; a rerun skips the rows already there, so a run that is killed or stopped at the
end of a session continues where it stopped. Each model is pruned once (calibration c4 64 x 512 seed
0, float32), saved with ``hfprune.save_pretrained`` under ``--cache`` and reloaded from there for
every evaluation; scores come from ``hfprune.evaluate(model, tokenizer, tasks=TASK)`` (lm-evaluation-
harness on the task configs shipped in hfprune and the local splits; HellaSwag is the 1,000-item
exact-format subset, ``limit`` null = the full split).

Work order, most valuable rows first: dense on the five discriminating tasks, then the 2:4 models,
the 50 % models, the compensated structured model at 0.8x parameters, and last the four other tasks
of the nine-task suite (the papers' mean) for dense and the best 2:4 model (highest mean ``acc`` on
the five tasks, chosen when its turn comes).

Each row records the model and how it was made (config, equivalent ``hfprune prune`` command, prune
seconds), the task, acc / acc_norm / perplexity with their stderr, n, the lm-eval version, the
sha256 of the task config file and of its data files, limit, batch size, wall seconds, the 1-min load
average sampled every 5 s during the row (max / mean, cores; ``quiet`` when max <= cores + 0.5), the
hfprune commit and the torch threads.

    python scripts/bench_zeroshot.py --output OUT.json --cache DIR        # everything, in the order above
    python scripts/bench_zeroshot.py --output OUT.json --plan             # what is done and what is left
    python scripts/bench_zeroshot.py --models dense --tasks arc_easy --limit 5 --output /tmp/smoke.json
    python scripts/bench_report.py --section zeroshot_harness --from OUT.json   # the table in docs/BENCHMARKS.md

Long runs: start it in the background at low priority and rerun the same command to resume (rows already in
OUT.json are skipped, pruned checkpoints already in DIR are reused)::

    nohup nice -n 19 python scripts/bench_zeroshot.py --output OUT.json --cache DIR > log.txt 2>&1 &
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import PROTOCOL, LoadSampler, git_commit, unique_params, write_json  # noqa: E402

FIVE = ("arc_easy", "piqa", "winogrande", "hellaswag", "lambada_openai")
NINE_EXTRA = ("arc_challenge", "boolq", "openbookqa", "rte")  # with FIVE: the nine-task suite
CALIBRATION = {"dataset": PROTOCOL["calibration"], "nsamples": PROTOCOL["nsamples"], "seqlen": PROTOCOL["seqlen"],
               "seed": PROTOCOL["seed"]}
# SmolLM2-135M's MLP has 1536 neurons per block; removing 519 of them (0.337890625) leaves 0.800x the parameters:
# the best 0.8x point of the structured Pareto (docs/BENCHMARKS.md; README: --mlp-ratio 0.338).
MLP_08 = 519 / 1536
# name -> (pruning config for hfprune.PruningConfig.from_dict, the equivalent CLI flags); None: the dense model.
MODELS: dict[str, tuple[dict | None, str | None]] = {
    "dense": (None, None),
    "admm-2of4": ({"method": "admm", "pattern": "2:4"}, "--method admm --pattern 2:4"),
    "sparsegpt-2of4": ({"method": "sparsegpt", "pattern": "2:4"}, "--method sparsegpt --pattern 2:4"),
    "wanda-2of4": ({"method": "wanda", "pattern": "2:4"}, "--method wanda --pattern 2:4"),
    "admm-50": ({"method": "admm", "sparsity": 0.5}, "--method admm --sparsity 0.5"),
    "sparsegpt-50": ({"method": "sparsegpt", "sparsity": 0.5}, "--method sparsegpt --sparsity 0.5"),
    "wanda-50": ({"method": "wanda", "sparsity": 0.5}, "--method wanda --sparsity 0.5"),
    "obs-mlp-0.8x": ({"method": "structured", "importance": "obs", "mlp_ratio": MLP_08},
                     f"--method obs --target mlp --mlp-ratio {MLP_08}"),
    # the same 0.80x budget with blocks 0 and 29 left whole (docs/BENCHMARKS.md, "which blocks"): 556 of 1536
    # neurons removed from each of the other 28 blocks
    "obs-mlp-0.8x-whole-0+29": ({"method": "structured", "importance": "obs", "mlp_ratio": 556 / 1536,
                                 "ignore": [r"model\.layers\.(0|29)\..*"]},
                                f"--method obs --target mlp --mlp-ratio {556 / 1536} "
                                r"--ignore 'model\.layers\.(0|29)\..*'"),
}
TWO_FOUR = ("admm-2of4", "sparsegpt-2of4", "wanda-2of4")
BEST_2OF4 = "best-2of4"  # placeholder in the plan, resolved when its turn comes

log = logging.getLogger("bench_zeroshot")


# ------------------------------------------------------------------------------------ bookkeeping
def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def task_config_info(task: str, task_dir: str | None, data_dir: str | None) -> dict:
    """The task's config file (the YAML whose ``task:`` is ``task``) with its sha256, and the sha256 of its data
    (over the data folder's SHA256SUMS lines for the files it names, or the files themselves)."""
    out: dict = {"file": None, "sha256": None, "data_files": [], "data_sha256": None}
    if not task_dir:
        return out
    for path in sorted(Path(task_dir).glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        if re.search(rf"^task:\s*{re.escape(task)}\s*$", text, flags=re.M):
            out["file"] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
            out["sha256"] = _sha256(path)
            out["data_files"] = re.findall(r"^\s+(?:validation|test|train):\s*(\S+)", text, flags=re.M)
            break
    if data_dir and out["data_files"]:
        root = Path(data_dir)
        sums = root / "SHA256SUMS"
        lines = sums.read_text().splitlines() if sums.exists() else []
        digest = hashlib.sha256()
        for rel in out["data_files"]:
            mine = sorted(ln for ln in lines if ln.split("  ./", 1)[-1].startswith(rel))
            if mine:
                digest.update("\n".join(mine).encode())
            elif (root / rel).is_file():
                digest.update(_sha256(root / rel).encode())
            else:
                return out  # unknown data: no hash rather than a wrong one
        out["data_sha256"] = digest.hexdigest()
    return out


def read_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"script": "scripts/bench_zeroshot.py",
            "protocol": {"model": PROTOCOL["model"], "dtype": PROTOCOL["dtype"], "calibration": CALIBRATION,
                         "tasks": {"five": list(FIVE), "nine": [*FIVE, *NINE_EXTRA]}},
            "models": {}, "rows": []}


def find_row(results: dict, model: str, task: str, limit) -> dict | None:
    return next((r for r in results["rows"] if r["model"] == model and r["task"] == task and r["limit"] == limit),
                None)


# ------------------------------------------------------------------------------------ models
def prune_command(name: str, calibration: dict) -> str | None:
    flags = MODELS[name][1]
    calib = (f"--calibration {calibration['dataset']} --nsamples {calibration['nsamples']} "
             f"--seqlen {calibration['seqlen']} --seed {calibration['seed']}")
    return None if flags is None else f"hfprune prune --model {PROTOCOL['model']} {flags} {calib} --output DIR"


def get_model(name: str, cache: Path, calibration: dict):
    """(model, tokenizer, checkpoint, record) of ``name``: the dense alias, or the pruned checkpoint in ``cache``
    (pruned and saved first when it is not there); the record says how it was made."""
    import torch

    import hfprune

    tok = hfprune.load_tokenizer(PROTOCOL["model"])
    config, _ = MODELS[name]
    if config is None:
        model = hfprune.load_model(PROTOCOL["model"], dtype=PROTOCOL["dtype"])
        record = {"method": "dense", "config": None, "command": None, "params": unique_params(model),
                  "checkpoint": PROTOCOL["model"]}
        return model, tok, PROTOCOL["model"], record
    ckpt = cache / name
    meta_path = ckpt / "bench_zeroshot_model.json"
    if not meta_path.exists():
        model = hfprune.load_model(PROTOCOL["model"], dtype=PROTOCOL["dtype"])
        cfg = hfprune.PruningConfig.from_dict(dict(config))
        print(f"[{now()}] pruning {name}: {cfg}", flush=True)
        with LoadSampler() as load:
            start = time.perf_counter()
            report = hfprune.prune(model, tok, cfg, calibration=hfprune.CalibrationConfig(**calibration),
                                   progress=False)
            seconds = time.perf_counter() - start
        meta = {"method": report.method, "config": report.config, "calibration": calibration,
                "command": prune_command(name, calibration), "prune_seconds": seconds, "engine_prune_seconds": report.prune_seconds,
                "peak_rss_mb": report.peak_rss_mb, "sparsity": report.sparsity, "params": unique_params(model),
                "prune_load": load.summary(), "hfprune_commit": git_commit(), "torch_threads": torch.get_num_threads(),
                "pruned_at": now(), "checkpoint": str(ckpt)}
        hfprune.save_pretrained(model, ckpt, tokenizer=tok, report=report, command=meta["command"], overwrite=True,
                                extra_files={meta_path.name: meta})
        del model
        print(f"[{now()}] pruned {name} in {seconds:.0f} s -> {ckpt}", flush=True)
    meta = json.loads(meta_path.read_text())
    if meta.get("calibration") != calibration:
        raise SystemExit(f"{ckpt} was pruned with calibration {meta.get('calibration')}, not {calibration}: "
                         f"use another --cache (or delete that folder).")
    return hfprune.load_model(ckpt, dtype=PROTOCOL["dtype"]), tok, str(ckpt), meta


# ------------------------------------------------------------------------------------ plan
def plan(models: list[str], tasks: list[str] | None) -> list[tuple[str, str]]:
    """(model, task) in the order they run; BEST_2OF4 stands for the best 2:4 model."""
    if tasks is not None:
        return [(m, t) for m in models for t in tasks]
    work = [(m, t) for m in models for t in FIVE]
    if "dense" in models:
        work += [("dense", t) for t in NINE_EXTRA]
    if any(m in models for m in TWO_FOUR):
        work += [(BEST_2OF4, t) for t in NINE_EXTRA]
    return work


def best_2of4(results: dict, limit) -> str | None:
    """The 2:4 model with the highest mean ``acc`` over the five tasks (all five scored at ``limit``)."""
    best, best_acc = None, None
    for name in TWO_FOUR:
        rows = [find_row(results, name, t, limit) for t in FIVE]
        if all(rows):
            acc = sum(r["metrics"]["acc"] for r in rows) / len(rows)
            if best_acc is None or acc > best_acc:
                best, best_acc = name, acc
    return best


def evaluate_row(model, tok, name: str, checkpoint: str, task: str, args) -> dict:
    import torch
    import lm_eval

    import hfprune

    started = now()
    with LoadSampler() as load:
        start = time.perf_counter()
        result = hfprune.evaluate(model, tok, tasks=task, limit=args.limit, batch_size=args.batch_size)
        wall = time.perf_counter() - start
    zs = result["zeroshot"]
    metrics = zs["tasks"][task]
    return {
        "model": name, "task": task, "limit": args.limit, "checkpoint": checkpoint,
        "metrics": metrics, "n": metrics.get("n"),
        "linear_sparsity": result.get("linear_sparsity"), "params": unique_params(model),
        "lm_eval_version": zs.get("lm_eval_version") or getattr(lm_eval, "__version__", None),
        "task_config": task_config_info(task, zs.get("task_dir"), zs.get("data_dir")),
        "batch_size": args.batch_size, "num_fewshot": zs.get("num_fewshot", 0),
        "wall_seconds": wall, "harness_seconds": zs.get("seconds"), "load": load.summary(),
        "torch_threads": torch.get_num_threads(), "nice": os.nice(0), "hfprune_commit": git_commit(),
        "started": started, "finished": now(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=ROOT / "bench_out" / "zeroshot_harness.json",
                    help="results JSON (rows are added; rerun to resume)")
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/hfprune/bench_zeroshot").expanduser(),
                    help="folder for the pruned checkpoints (outside git)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list, in this order: {', '.join(MODELS)}")
    ap.add_argument("--tasks", default=None,
                    help="comma list: these tasks for every model instead of the plan (five tasks for all, "
                         "the other four of the nine for dense and the best 2:4 model)")
    ap.add_argument("--limit", type=int, default=None, help="first N documents per task (default: full splits)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--nsamples", type=int, default=CALIBRATION["nsamples"],
                    help="calibration windows (the protocol's 64; fewer only for a quick check, with its own --cache)")
    ap.add_argument("--max-rows", type=int, default=None, help="stop after scoring this many rows")
    ap.add_argument("--plan", action="store_true", help="print the plan (done / to do) and exit")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    out = args.output.expanduser().resolve()
    results = read_results(out)
    results.setdefault("machine", {"cpus": os.cpu_count(), "platform": platform.platform(),
                                   "python": platform.python_version()})
    work = plan(models, tasks)

    if args.plan:
        for model, task in work:
            name = best_2of4(results, args.limit) or BEST_2OF4 if model == BEST_2OF4 else model
            row = find_row(results, name, task, args.limit)
            state = f"done {row['wall_seconds']:.0f} s" if row else "to do"
            print(f"{name:16s} {task:16s} {state}")
        return

    done = 0
    loaded = (None,) * 5  # name, model, tokenizer, checkpoint, record
    for model_name, task in work:
        if model_name == BEST_2OF4:
            model_name = best_2of4(results, args.limit)
            if model_name is None:
                print(f"skip {BEST_2OF4}/{task}: no 2:4 model has all five tasks yet", flush=True)
                continue
        if find_row(results, model_name, task, args.limit):
            continue
        if args.max_rows is not None and done >= args.max_rows:
            break
        if loaded[0] != model_name:
            loaded = (None,) * 5  # free the previous model first
            args.cache.mkdir(parents=True, exist_ok=True)
            loaded = (model_name, *get_model(model_name, args.cache, {**CALIBRATION, "nsamples": args.nsamples}))
        _, model, tok, ckpt, record = loaded
        print(f"[{now()}] {model_name} / {task} ...", flush=True)
        row = evaluate_row(model, tok, model_name, ckpt, task, args)
        results["models"][model_name] = record
        results["best_2of4"] = best_2of4(results, args.limit)
        results["rows"] = [r for r in results["rows"]
                           if not (r["model"] == model_name and r["task"] == task and r["limit"] == args.limit)]
        results["rows"].append(row)
        results["best_2of4"] = best_2of4(results, args.limit)
        write_json(out, results)
        done += 1
        m = row["metrics"]
        print(f"[{now()}] {model_name} / {task}: acc {m.get('acc')} acc_norm {m.get('acc_norm')} "
              f"ppl {m.get('perplexity')} n {row['n']} in {row['wall_seconds']:.0f} s "
              f"(max load {row['load']['max_1min']} on {row['load']['cores']} cores)", flush=True)
    print(f"{len(results['rows'])} rows in {out}", flush=True)


if __name__ == "__main__":
    main()
