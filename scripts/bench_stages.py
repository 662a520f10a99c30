"""Multi-stage pruning on SmolLM2-135M, saved as compressed-tensors and reloaded with stock transformers.

Two stage lists (the recipes ``recipes/stages-mlp25-admm24-int4.yaml`` and ``recipes/stages-mlp25-int4.yaml``):

* ``mlp25-admm24-int4``: remove 25 % of the MLP neurons (structured OBS + compensation), then 2:4 with ADMM,
  then int4 g64 (GPTQ on SparseGPT's solver, the 2:4 zeros kept);
* ``mlp25-int4``: the same width stage, then int4 g64 only.

The whole list is validated first (``core.stages.check_stages``, as ``hfprune.prune`` does); the stages then run
one ``hfprune.prune`` call each on the same calibration windows (c4 64 x 512 seed 0 drawn from the same seed, as
the list run draws them once), so the WikiText-2 perplexity (32 windows of 2048) can be measured after each. A stage prefix two lists share
(the width stage) runs once; the later list continues from a copy of that model.
The result is cast to ``--save-dtype`` (bfloat16: the embeddings and norms a user ships) and saved with ``hfprune.save_pretrained(format="compressed-tensors", bits=4, group_size=64)`` and
reloaded in a fresh process that imports only transformers (the ``compressed-tensors`` package reads the
format); the reloaded logits are compared with the in-memory model's. Sizes: the saved safetensors against
the dense model saved in bf16.

    python scripts/bench_stages.py --output docs/results/stages.json
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import PROTOCOL, git_commit, machine, unique_params, write_json  # noqa: E402

STAGES = {
    "mlp25-admm24-int4": [{"method": "structured", "mlp_ratio": 0.25}, {"method": "admm", "pattern": "2:4"},
                          {"method": "sparsegpt", "sparsity": 0.0, "bits": 4, "group_size": 64}],
    "mlp25-int4": [{"method": "structured", "mlp_ratio": 0.25},
                   {"method": "sparsegpt", "sparsity": 0.0, "bits": 4, "group_size": 64}],
}

RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[4])).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save(logits, sys.argv[3])
print(type(model).__name__, "hfprune" in sys.modules)
"""


def safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_list(name: str, stages: list[dict], args, out: Path, done: dict) -> dict:
    import hfprune
    from hfprune.config import config_from_dict
    from hfprune.core.stages import check_stages
    from hfprune.io import check_save_args
    from hfprune.eval.perplexity import eval_token_ids
    from hfprune.registry import get_pruner_cls

    model = hfprune.load_model(PROTOCOL["model"], dtype=PROTOCOL["dtype"])
    tok = hfprune.load_tokenizer(PROTOCOL["model"])
    dense_params = unique_params(model)
    configs = [config_from_dict(dict(s)) for s in stages]
    check_stages(model, [get_pruner_cls(c.method)(c) for c in configs])  # the list's own up-front check
    check_save_args("compressed-tensors", 4, 64, model=model)  # the save's group size fits every layer: before work
    calib = dict(dataset=PROTOCOL["calibration"], nsamples=args.nsamples, seqlen=args.seqlen, seed=PROTOCOL["seed"])
    eval_ids = eval_token_ids(tok, PROTOCOL["eval_dataset"])
    rows = []
    report = None
    for k, cfg in enumerate(configs):
        prefix = json.dumps(stages[:k + 1], sort_keys=True)
        if prefix in done:  # an earlier list ran the same stages: its model and row (same calibration, same code)
            model, report, row = copy.deepcopy(done[prefix])
            rows.append({**row, "shared_with_earlier_list": True})
            continue
        t0 = time.perf_counter()
        report = hfprune.prune(model, tok, cfg, calibration=calib)
        seconds = time.perf_counter() - t0
        ppl = hfprune.perplexity(model, token_ids=eval_ids, seqlen=PROTOCOL["eval_seqlen"],
                                 max_windows=args.max_windows, progress=False)["perplexity"]
        rows.append({"stage": k + 1, "config": stages[k], "prune_seconds": round(seconds, 1),
                     "params": unique_params(model), "perplexity": round(ppl, 3)})
        done[prefix] = copy.deepcopy((model, report, rows[-1]))
        print(f"[{name}] stage {k + 1} {stages[k]}: ppl {ppl:.3f}, {seconds:.1f} s", flush=True)
    folder = out / name
    model = model.to(getattr(torch, args.save_dtype))  # what a user ships: int4 Linears, the rest (embeddings) in bf16
    hfprune.save_pretrained(model, folder, format="compressed-tensors", bits=4, group_size=64, tokenizer=tok,
                            report=report)
    probe = eval_ids[:, :256]
    with torch.no_grad():
        mine = model(input_ids=probe).logits
    logits_file = out / f"{name}-reload.pt"
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(folder), json.dumps(probe.tolist()), str(logits_file),
                           args.save_dtype],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"stock reload of {folder} failed:\n{proc.stderr[-3000:]}")
    theirs = torch.load(logits_file)
    return {"stages": rows, "dense_params": dense_params, "saved_bytes": safetensors_bytes(folder),
            "reload": {"class": proc.stdout.split()[0], "hfprune_imported": proc.stdout.split()[1] == "True",
                       "max_abs_logit_diff": float((mine - theirs).abs().max())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lists", default=",".join(STAGES), help="comma-separated: " + ", ".join(STAGES))
    p.add_argument("--nsamples", type=int, default=PROTOCOL["nsamples"])
    p.add_argument("--seqlen", type=int, default=PROTOCOL["seqlen"])
    p.add_argument("--max-windows", type=int, default=PROTOCOL["max_windows"])
    p.add_argument("--output", default="bench_out/stages.json")
    p.add_argument("--save-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype of the saved checkpoint's unquantized tensors (embeddings, norms); the stages and "
                        "perplexities run in float32")
    p.add_argument("--keep", default=None, help="folder for the saved checkpoints (default: a temporary one)")
    args = p.parse_args()
    import hfprune

    result = {"protocol": {**PROTOCOL, "nsamples": args.nsamples, "seqlen": args.seqlen,
                           "max_windows": args.max_windows},
              "machine": machine(), "command": " ".join(sys.argv), "save_dtype": args.save_dtype,
              "commit": git_commit(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or tmp)
        out.mkdir(parents=True, exist_ok=True)
        dense = hfprune.load_model(PROTOCOL["model"], dtype="bfloat16")
        dense.save_pretrained(out / "dense-bf16")
        result["dense_bf16_bytes"] = safetensors_bytes(out / "dense-bf16")
        del dense
        done: dict = {}  # stage prefixes already run (both lists start with the same width stage)
        for name in args.lists.split(","):
            run = run_list(name, STAGES[name], args, out, done)
            run["size_vs_dense_bf16"] = round(run["saved_bytes"] / result["dense_bf16_bytes"], 4)
            result["runs"][name] = run
            write_json(Path(args.output), result)
    print(json.dumps({k: {"ppl": [s["perplexity"] for s in v["stages"]], "size": v["size_vs_dense_bf16"],
                          "reload_diff": v["reload"]["max_abs_logit_diff"]} for k, v in result["runs"].items()}))


if __name__ == "__main__":
    main()
