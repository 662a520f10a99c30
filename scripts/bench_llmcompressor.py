"""llm-compressor 0.14 on the same protocol as scripts/bench_oneshot.py (run with its own venv).

llm-compressor caps transformers at 5.17, so it lives in .venv-llmc:

    python3 -m venv .venv-llmc && .venv-llmc/bin/pip install torch==2.13.0 \\
        && .venv-llmc/bin/pip install llmcompressor==0.14.0.1 gguf && .venv-llmc/bin/pip install --no-deps -e .
    .venv-llmc/bin/python scripts/bench_llmcompressor.py --runs wanda-50,wanda-2of4

hfprune is installed there without dependencies only to draw the same calibration windows and to
score perplexity with the same code; the pruning is llm-compressor's `oneshot` (sequential
pipeline, decoder projections only: `targets=["re:.*layers.*proj$"]`, lm_head excluded).
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
    # No magnitude run: llm-compressor 0.14's MagnitudePruningModifier follows a training schedule, and
    # under `oneshot` (init_sparsity = final_sparsity = 0.5) it left the weights dense here (0.03 % zeros).
    "wanda-50": ("WandaPruningModifier", {"sparsity": 0.5, "mask_structure": "0:0"}),
    "wanda-2of4": ("WandaPruningModifier", {"sparsity": 0.5, "mask_structure": "2:4"}),
    "sparsegpt-50": ("SparseGPTModifier", {"sparsity": 0.5, "mask_structure": "0:0"}),
    "sparsegpt-2of4": ("SparseGPTModifier", {"sparsity": 0.5, "mask_structure": "2:4"}),
}


def oneshot_sparsity(model, ds, recipe, nsamples: int, seqlen: int) -> tuple[float, float]:
    """llm-compressor's ``oneshot`` with its sequential pipeline on ``ds``: (seconds, zero fraction of the
    decoder blocks' linear weights). scripts/bench_scaling.py runs its llm-compressor side through this too."""
    import torch
    from llmcompressor import oneshot

    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=nsamples, max_seq_length=seqlen,
            pipeline="sequential", shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    zeros = numel = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            zeros += int((module.weight == 0).sum())
            numel += module.weight.numel()
    return seconds, zeros / numel


def child(name: str, args) -> dict:
    import datasets
    import torch
    from llmcompressor.modifiers import pruning
    from transformers import AutoModelForCausalLM

    import hfprune
    from hfprune.core.calibration import get_calibration_ids
    from hfprune.config import CalibrationConfig
    from hfprune.models import resolve_model_path

    path = resolve_model_path(PROTOCOL["model"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = hfprune.load_tokenizer(PROTOCOL["model"])
    ids = get_calibration_ids(CalibrationConfig(dataset=PROTOCOL["calibration"], nsamples=args.nsamples,
                                                seqlen=args.seqlen, seed=PROTOCOL["seed"]), tok)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    row = {"run": name, "tool": "llm-compressor"}
    if args.forward_ref:
        # plain forward (batch 8) over the same tokens in this process, right before pruning
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, ids.shape[0], 8):
                model(input_ids=ids[i:i + 8], use_cache=False)
        row["forward_ref_seconds"] = time.perf_counter() - start
    cls_name, kwargs = RUNS[name]
    modifier_cls = getattr(pruning, cls_name)
    recipe = modifier_cls(targets=["re:.*layers.*proj$"], **kwargs)
    seconds, sparsity = oneshot_sparsity(model, ds, recipe, args.nsamples, args.seqlen)
    row.update({"modifier": cls_name, "prune_seconds": seconds, "sparsity": sparsity,
                "lm_head_sparsity": float((model.lm_head.weight == 0).float().mean())})
    if "forward_ref_seconds" in row:
        row["prune_over_forward"] = seconds / row["forward_ref_seconds"]
    if not args.skip_eval:
        ppl = hfprune.perplexity(model, tok, PROTOCOL["eval_dataset"], seqlen=PROTOCOL["eval_seqlen"],
                                 max_windows=args.max_windows, progress=False)
        row.update(perplexity=ppl["perplexity"], eval_windows=ppl["windows"])
    import resource

    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(parser, "wanda-50,wanda-2of4,sparsegpt-50,sparsegpt-2of4", "bench_out/llmcompressor.json",
                      runs_help=f"comma list of {', '.join(RUNS)}")
    args = parser.parse_args()
    if args.child:
        write_json(Path(args.child_json), child(args.child, args))
        return
    import llmcompressor

    out = Path(args.output)
    result, passthrough = protocol_result(args, {**machine(), "llmcompressor": llmcompressor.__version__})
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs.split(","):
            row = run_child(__file__, ["--child", name, *passthrough], Path(tmp) / f"{name}.json")
            result["runs"][name] = row
            print(f"llm-compressor {name:16s} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in row.items() if k != "run"), flush=True)
            write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
