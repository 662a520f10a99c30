"""Cheap proxy for the reconstruction solvers: layer output error on real SmolLM2 Hessians.

``dump`` records, for some decoder blocks, every linear layer's dense weight and the Hessian sums
SparseGPT/ADMM see (protocol calibration: c4 64 x 512 seed 0, dense model; the engine's true
sequential order), without pruning. ``compare`` then runs SparseGPT and ADMM variants on them and
reports the mean relative output error ``||(W - W') X|| / ||W X||`` over the layers (from the
Hessian alone, :func:`hfprune.solvers.lstsq.relative_output_error`) and its ratio to SparseGPT's.

    .venv/bin/python scripts/bench_admm_proxy.py dump --blocks 0,2,5,9,15 --out bench_out/hess
    .venv/bin/python scripts/bench_admm_proxy.py compare --hess bench_out/hess \\
        --layers 'layers.0.self_attn.q|layers.0.mlp.gate|layers.0.mlp.down|layers.9.self_attn.o|layers.9.mlp.up|layers.9.mlp.down' \\
        --variants '{"i10": {"iterations": 10, "prune_iterations": 7}}' --settings 0.5,2:4,0.7 \\
        --output bench_out/admm_proxy.json
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import PROTOCOL, write_json  # noqa: E402


class _Done(Exception):
    pass


def dump(args) -> None:
    import torch

    import hfprune
    from hfprune.core.calibration import get_calibration_ids
    from hfprune.config import CalibrationConfig
    from hfprune.methods.base import PruneResult
    from hfprune.methods.sparsegpt import SparseGPTConfig, SparseGPTPruner
    from hfprune.registry import register_pruner

    blocks = {int(b) for b in args.blocks.split(",")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = hfprune.load_model(PROTOCOL["model"], dtype=PROTOCOL["dtype"])
    tok = hfprune.load_tokenizer(PROTOCOL["model"])
    names = {m.weight.data_ptr(): n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    @dataclass
    class RecordConfig(SparseGPTConfig):
        method: ClassVar[str] = "record-hessians"

    @register_pruner("record-hessians", config_cls=RecordConfig)
    class RecordPruner(SparseGPTPruner):
        def prune_weight(self, W, stats, sparsity, scope):
            name = names[W.data_ptr()]
            block = int(name.split(".layers.")[1].split(".")[0])
            if block > max(blocks):
                raise _Done
            if block in blocks:
                torch.save({"W": W.detach().clone(), "xtx": stats.xtx.clone(), "count": stats.count},
                           out / f"{name}.pt")
            return PruneResult(pruned=torch.zeros_like(W, dtype=torch.bool))

    ids = get_calibration_ids(CalibrationConfig(dataset=PROTOCOL["calibration"], nsamples=PROTOCOL["nsamples"],
                                                seqlen=PROTOCOL["seqlen"], seed=PROTOCOL["seed"]), tok)
    try:
        hfprune.prune(model, tok, RecordConfig(sparsity=0.5), calibration=ids, progress=True)
    except _Done:
        pass
    print(f"wrote {out}")


def compare(args) -> None:
    import torch

    from hfprune.solvers.admm import admm_prune
    from hfprune.solvers.lstsq import relative_output_error
    from hfprune.solvers.sparsegpt import sparsegpt_prune

    files = [f for f in sorted(glob.glob(f"{args.hess}/*.pt")) if any(o in f for o in args.layers.split("|"))]
    layers = []
    for f in files:
        d = torch.load(f)
        layers.append((Path(f).stem, d["W"].float(), (d["xtx"] * (2.0 / d["count"])).float()))
    variants = json.loads(args.variants)
    result = {"command": " ".join(sys.argv), "layers": [n for n, _, _ in layers], "settings": {}}
    for setting in args.settings.split(","):
        pattern = setting if ":" in setting else "unstructured"
        sparsity = 0.5 if ":" in setting else float(setting)
        solvers = {"sparsegpt": lambda W, H: sparsegpt_prune(W, H, sparsity, pattern),
                   "sparsegpt-act_order": lambda W, H: sparsegpt_prune(W, H, sparsity, pattern, act_order=True)}
        for name, kw in variants.items():
            solvers[name] = lambda W, H, kw=kw: admm_prune(W, H, sparsity, pattern, **kw)
        rows = {}
        for name, fn in solvers.items():
            start = time.perf_counter()
            errs = [relative_output_error(W, fn(W, H)[0], H) for _, W, H in layers]
            rows[name] = {"mean_error": sum(errs) / len(errs), "errors": errs, "seconds": time.perf_counter() - start}
            rows[name]["vs_sparsegpt"] = rows[name]["mean_error"] / rows["sparsegpt"]["mean_error"]
            print(f"{setting:5s} {name:22s} mean_err={rows[name]['mean_error']:.4f} "
                  f"vs_sparsegpt={rows[name]['vs_sparsegpt']:.3f} seconds={rows[name]['seconds']:.1f}", flush=True)
        result["settings"][setting] = rows
        write_json(Path(args.output), result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--blocks", default="0,2,5,9,15")
    d.add_argument("--out", default="bench_out/hess")
    c = sub.add_parser("compare")
    c.add_argument("--hess", default="bench_out/hess")
    c.add_argument("--layers", default="")
    c.add_argument("--variants", default='{"admm": {}}')
    c.add_argument("--settings", default="0.5,2:4,0.7")
    c.add_argument("--output", default="bench_out/admm_proxy.json")
    args = parser.parse_args()
    dump(args) if args.cmd == "dump" else compare(args)


if __name__ == "__main__":
    main()
