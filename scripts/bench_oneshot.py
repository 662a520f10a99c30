"""One-shot pruning benchmark on SmolLM2-135M (the issues' protocol), one fresh process per run.

Protocol: fp32, calibration c4 64 x 512 tokens seed 0, evaluation WikiText-2 seqlen 2048 first 32
windows. For every run: prune wall time (the engine only), peak RSS, perplexity, per-layer
exactness (unstructured: zeros = round(s * numel); N:M: every group holds). The "forward" run
times one plain forward pass of the model over the same calibration tokens, so
``prune_seconds / forward_seconds`` compares like with like.

    .venv/bin/python scripts/bench_oneshot.py                       # all runs -> bench_out/oneshot.json
    .venv/bin/python scripts/bench_oneshot.py --runs wanda-50,wanda-2of4 --max-windows 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import PROTOCOL, add_protocol_args, machine, protocol_result, run_child, write_json  # noqa: E402

RUNS = {
    "dense": None,
    "magnitude-50": {"method": "magnitude", "sparsity": 0.5},
    "magnitude-2of4": {"method": "magnitude", "pattern": "2:4"},
    "wanda-50": {"method": "wanda", "sparsity": 0.5},
    "wanda-2of4": {"method": "wanda", "pattern": "2:4"},
    # Wanda's default order is its paper's (true_sequential=False); "-ts" runs the other order.
    "wanda-50-ts": {"method": "wanda", "sparsity": 0.5, "true_sequential": True},
    "wanda-2of4-ts": {"method": "wanda", "pattern": "2:4", "true_sequential": True},
    "sparsegpt-50": {"method": "sparsegpt", "sparsity": 0.5},
    "sparsegpt-2of4": {"method": "sparsegpt", "pattern": "2:4"},
    "sparsegpt-2of4-ao": {"method": "sparsegpt", "pattern": "2:4", "act_order": True},
    # SparseGPT's default order is llm-compressor's and its paper's (true_sequential=False); "-ts" the other.
    "sparsegpt-50-ts": {"method": "sparsegpt", "sparsity": 0.5, "true_sequential": True},
    "sparsegpt-2of4-ts": {"method": "sparsegpt", "pattern": "2:4", "true_sequential": True},
    "wanda-70": {"method": "wanda", "sparsity": 0.7},
    "wanda-owl-70": {"method": "wanda", "sparsity": 0.7, "owl": True},
    "sparsegpt-50-int4": {"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 128},
    "sparsegpt-70": {"method": "sparsegpt", "sparsity": 0.7},
    # ADMM with a gradual mask (hfprune.solvers.admm), beside SparseGPT in the same run.
    "admm-50": {"method": "admm", "sparsity": 0.5},
    "admm-2of4": {"method": "admm", "pattern": "2:4"},
    "admm-70": {"method": "admm", "sparsity": 0.7},
    "admm-50-int4": {"method": "admm", "sparsity": 0.5, "bits": 4, "group_size": 128},
    # Ablations of the ADMM method (docs/BENCHMARKS.md): the mask fixed from the start (weight update
    # only), the mask compared per row, and twice the iterations.
    "admm-2of4-fixedmask": {"method": "admm", "pattern": "2:4", "prune_iterations": 0},
    "admm-50-fixedmask": {"method": "admm", "sparsity": 0.5, "prune_iterations": 0},
    "admm-50-row": {"method": "admm", "sparsity": 0.5, "scope": "row"},
    "admm-2of4-i20": {"method": "admm", "pattern": "2:4", "iterations": 20, "prune_iterations": 15},
    # The ridge (dampening) on the normalised Hessian: 0.1 is Boza's.
    "admm-2of4-d.03": {"method": "admm", "pattern": "2:4", "dampening": 0.03},
    "admm-2of4-d.3": {"method": "admm", "pattern": "2:4", "dampening": 0.3},
    # What each layer is fit to (dense_targets): "block" is admm's default; "off" is the method before it.
    "admm-2of4-off": {"method": "admm", "pattern": "2:4", "dense_targets": "off"},
    "admm-50-off": {"method": "admm", "sparsity": 0.5, "dense_targets": "off"},
    "admm-70-off": {"method": "admm", "sparsity": 0.7, "dense_targets": "off"},
    "admm-2of4-model": {"method": "admm", "pattern": "2:4", "dense_targets": "model"},
    "sparsegpt-2of4-block": {"method": "sparsegpt", "pattern": "2:4", "dense_targets": "block", "true_sequential": True},
    "sparsegpt-50-block": {"method": "sparsegpt", "sparsity": 0.5, "dense_targets": "block", "true_sequential": True},
}
# Perplexity-vs-sparsity points for the plot: <method>-<percent> and <method>-4of8.
for _method in ("magnitude", "wanda", "sparsegpt", "admm"):
    for _pct in (30, 40, 50, 60, 70, 80):
        RUNS.setdefault(f"{_method}-{_pct}", {"method": _method, "sparsity": _pct / 100})
    RUNS.setdefault(f"{_method}-2of4", {"method": _method, "pattern": "2:4"})
    RUNS.setdefault(f"{_method}-4of8", {"method": _method, "pattern": "4:8"})
DEFAULT_RUNS = "forward,dense,magnitude-50,magnitude-2of4,wanda-50,wanda-2of4,sparsegpt-50,sparsegpt-2of4"


def plain_forward_seconds(model, ids, batch_size: int) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[i:i + batch_size], use_cache=False)
    return time.perf_counter() - start


def child(name: str, args) -> dict:
    import torch

    import hfprune
    from hfprune.arch import weight_matrix
    from hfprune.core.calibration import get_calibration_ids
    from hfprune.config import CalibrationConfig
    from hfprune.solvers.masks import check_nm, prune_count

    model = hfprune.load_model(PROTOCOL["model"], dtype=PROTOCOL["dtype"])
    tok = hfprune.load_tokenizer(PROTOCOL["model"])
    ids = get_calibration_ids(CalibrationConfig(dataset=PROTOCOL["calibration"], nsamples=args.nsamples,
                                                seqlen=args.seqlen, seed=PROTOCOL["seed"]), tok)
    row = {"run": name}
    if name == "forward":
        best = None
        for bs in (8, args.nsamples):
            seconds = plain_forward_seconds(model, ids, bs)
            row[f"forward_seconds_bs{bs}"] = seconds
            best = seconds if best is None else min(best, seconds)
        row["forward_seconds"] = best
        return row
    if name != "dense":
        if args.forward_ref:
            # A plain forward over the same tokens in this process, right before pruning: on a shared
            # machine the ratio prune / forward stays meaningful when the load drifts between runs.
            row["forward_ref_seconds"] = plain_forward_seconds(model, ids, 8)
        config = hfprune.PruningConfig.from_dict(RUNS[name])
        modules = dict(model.named_modules())
        dense = {n: weight_matrix(m).detach().clone() for n, m in modules.items()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n}
        report = hfprune.prune(model, tok, config, calibration=ids, progress=False)
        row.update(prune_seconds=report.prune_seconds, peak_rss_mb=report.peak_rss_mb, sparsity=report.sparsity,
                   config=report.config, block_sparsity=[round(b["sparsity"], 4) for b in report.blocks])
        exact = True
        for lname, info in report.layers.items():
            W = weight_matrix(modules[lname])
            if config.pattern == "unstructured":
                zeros, due = int((W == 0).sum()), prune_count(W.numel(), info["target"])
                if getattr(config, "bits", None):
                    # Joint quantization: kept weights may also round to 0 on the grid.
                    exact &= zeros >= due - 1
                else:
                    exact &= abs(zeros - due) <= 1
            else:
                n, m = map(int, config.pattern.split(":"))
                exact &= check_nm(W, n, m)
        row["every_layer_exact"] = bool(exact)
        row["layers_checked"] = len(report.layers)
        # sha256 over the pruned layers' zero masks (bool bytes of W == 0, layers in report order): a changed
        # default shows up here without comparing checkpoints.
        import hashlib

        digest = hashlib.sha256()
        for lname in report.layers:
            digest.update((weight_matrix(modules[lname]) == 0).cpu().numpy().tobytes())
        row["mask_sha256"] = digest.hexdigest()
        # Weight reconstruction: ||W - W'||_F / ||W||_F per layer (pruned + quantized weights vs dense),
        # and for SparseGPT the relative layer-output error on the calibration inputs.
        werr = [float((weight_matrix(modules[n]).float() - dense[n].float()).norm() / dense[n].float().norm())
                for n in report.layers]
        row["weight_error"] = {"mean": sum(werr) / len(werr), "max": max(werr)}
        oerr = [info["output_error"] for info in report.layers.values() if "output_error" in info]
        if oerr:
            row["output_error"] = {"mean": sum(oerr) / len(oerr), "max": max(oerr)}
        del dense
    if not args.skip_eval:
        ppl = hfprune.perplexity(model, tok, PROTOCOL["eval_dataset"], seqlen=PROTOCOL["eval_seqlen"],
                                 max_windows=args.max_windows, progress=False)
        row.update(perplexity=ppl["perplexity"], eval_windows=ppl["windows"], eval_seconds=ppl["seconds"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(parser, DEFAULT_RUNS, "bench_out/oneshot.json",
                      runs_help=f"comma list of forward and {', '.join(RUNS)}")
    parser.add_argument("--append", action="store_true", help="add to an existing --output instead of replacing it")
    args = parser.parse_args()
    if args.child:
        write_json(Path(args.child_json), child(args.child, args))
        return

    out = Path(args.output)
    result, passthrough = protocol_result(args, machine())
    if args.append and out.exists():
        import json

        previous = json.loads(out.read_text())
        result["runs"].update(previous.get("runs", {}))
        result["command"] = previous.get("command", "") + " ; " + result["command"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs.split(","):
            if name != "forward" and name not in RUNS:
                raise SystemExit(f"unknown run {name!r}; choose from forward, {', '.join(RUNS)}")
            row = run_child(__file__, ["--child", name, *passthrough], Path(tmp) / f"{name}.json")
            result["runs"][name] = row
            fwd = row.get("forward_ref_seconds") or result["runs"].get("forward", {}).get("forward_seconds")
            if fwd and "prune_seconds" in row:
                row["prune_over_forward"] = row["prune_seconds"] / fwd
            print(f"{name:18s} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in row.items() if k not in ("config", "block_sparsity", "run")),
                  flush=True)
            write_json(out, result)  # every finished run is kept
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
