"""Conformance benchmark: every causal-LM model type of the installed transformers, pruned by hfprune.

For each type in ``transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``:
build a tiny random model from the type's default config (:mod:`hfprune.arch.tiny`), prune it with
Wanda 50 % and Wanda 2:4 from random-token calibration, and check the targets, finiteness and a
``save_pretrained`` -> stock ``from_pretrained`` round trip with equal logits
(:func:`hfprune.workflows.conformance.check_model_type`). Types whose tiny model cannot be built (or whose
stock dense forward fails) are listed with the reason and not counted as built.

    .venv/bin/python scripts/bench_architectures.py                    # all types -> bench_out/architectures.json
    .venv/bin/python scripts/bench_architectures.py --types qwen3_moe gemma3
    .venv/bin/python scripts/bench_report.py                           # table in docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _child(conn, model_type: str) -> None:
    from hfprune.workflows.conformance import check_model_type

    try:
        res = check_model_type(model_type)
    except BaseException as e:  # noqa: BLE001 - reported, not raised
        res = {"model_type": model_type, "status": "fail", "reason": f"{type(e).__name__}: {e}"[:300]}
    conn.send(json.loads(json.dumps(res, default=str)))
    conn.close()


def _run_isolated(model_type: str, timeout: int) -> dict:
    """One type in a forked process (a hang or a crash, or a model that changes global state, stays there)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, model_type), daemon=True)
    proc.start()
    child.close()
    res = None
    if parent.poll(timeout):
        try:
            res = parent.recv()
        except EOFError:
            res = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return res or {"model_type": model_type, "status": "fail", "reason": f"timed out after {timeout} s"}
    return res or {"model_type": model_type, "status": "fail", "reason": f"worker died (exit code {proc.exitcode})"}


def _write(out: Path, results: dict, types: list[str]) -> dict:
    from _bench_common import machine
    from hfprune.workflows.conformance import DEFAULT_CASES

    built = [r for r in results.values() if r["status"] in ("pass", "fail")]
    passed = [r for r in built if r["status"] == "pass"]
    summary = {"types": len(types), "run": len(results), "built": len(built), "passed": len(passed),
               "pass_rate_of_built": len(passed) / max(1, len(built))}
    data = {"command": "scripts/bench_architectures.py " + " ".join(sys.argv[1:]), "machine": machine(),
            "cases": DEFAULT_CASES, "summary": summary, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(out)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="*", help="model types (default: every causal-LM type)")
    parser.add_argument("--out", default=str(ROOT / "bench_out" / "architectures.json"))
    parser.add_argument("--timeout", type=int, default=180, help="seconds per model type")
    parser.add_argument("--resume", action="store_true", help="keep the types already in --out")
    parser.add_argument("--retry-failed", action="store_true", help="with --resume: run the failed types again")
    parser.add_argument("--rerun", nargs="*", help="with --resume: run these types again")
    args = parser.parse_args()

    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("hfprune").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine is shared
    types = args.types or list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    out = Path(args.out)
    results = {}
    if args.resume and out.exists():
        results = {k: v for k, v in json.loads(out.read_text())["results"].items() if k in types
                   and not (args.retry_failed and v["status"] == "fail") and k not in (args.rerun or [])}
    for i, model_type in enumerate(types):
        if model_type in results:
            continue
        t0 = time.perf_counter()
        res = _run_isolated(model_type, args.timeout)
        results[model_type] = res
        why = res.get("reason") or "; ".join(f"{k}: {v.get('error') or v.get('off_target') or ''}"
                                            for k, v in res.get("runs", {}).items() if not v.get("ok"))
        _write(out, results, types)
        print(f"[{i + 1}/{len(types)}] {model_type:28s} {res['status']:10s} {time.perf_counter() - t0:5.1f}s {why}"[:300],
              flush=True)
    print(json.dumps(_write(out, results, types)))

if __name__ == "__main__":
    main()
