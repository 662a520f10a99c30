"""Structured pruning of SmolLM2-135M: quality, size, reload and real speedup.

Each variant removes heads (``heads_ratio`` with ``gqa_mode``) and MLP neurons (``mlp_ratio``)
of every block, with an importance score and with or without the block-by-block least-squares
compensation of o_proj / down_proj (``compensation``), and measures: parameters (and the ratio
to dense), safetensors bytes, WikiText-2 perplexity (seqlen 2048, first ``--max-windows``
windows), forward latency (batch 1, 512 tokens) of the pruned model against the dense one in the
same process, the speedup against the ideal (dense / pruned parameters), and a stock
``from_pretrained`` reload in a fresh process (no hfprune import) for every uniform result.

The default variants sit at about 0.77x parameters (the setting of issue 19): 1 of 3 query
heads per KV group (``per_group``) and 30 % of the MLP neurons, plus two other head/MLP splits of
the same budget (whole KV groups; MLP only).

    .venv/bin/python scripts/bench_structured.py --max-windows 8            # -> bench_out/structured_compensation.json
    .venv/bin/python scripts/bench_structured.py --max-windows 8 --variants obs-bias --append --generate
    .venv/bin/python scripts/bench_report.py --section structured_compensation   # table in docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import PROTOCOL, git_commit, machine, unique_params, write_json  # noqa: E402

MAIN = dict(heads_ratio=1 / 3, mlp_ratio=0.30, gqa_mode="per_group")  # 0.773x parameters
VARIANTS = {
    # importance and compensation at the main setting
    "obs": dict(MAIN, importance="obs"),  # the default: greedy structured OBS + least squares
    "wanda": dict(MAIN, importance="wanda", compensation="none"),  # main-branch result before compensation
    "wanda-lstsq": dict(MAIN, importance="wanda", compensation="lstsq"),
    "flap": dict(MAIN, importance="fluctuation", bias_compensation=True, compensation="none"),  # FLAP
    "fluctuation-lstsq": dict(MAIN, importance="fluctuation", compensation="lstsq"),
    "obs-bias": dict(MAIN, importance="obs", bias_compensation=True),  # bias re-fitted with the weights
    "obs-dense": dict(MAIN, importance="obs", dense_targets="model"),  # re-fit to the dense model's outputs
    "magnitude": dict(MAIN, importance="magnitude", compensation="none"),
    # other splits of the same parameter budget between attention and MLP
    "obs-whole-group": dict(heads_ratio=1 / 3, mlp_ratio=0.27, gqa_mode="whole_group", importance="obs"),
    "obs-mlp-only": dict(heads_ratio=0.0, mlp_ratio=0.383, importance="obs"),
    # non-uniform widths (global ranking of Wanda scores; reload with hfprune)
    "obs-nonuniform": dict(MAIN, importance="obs", uniform=False),
    # which blocks (--ignore): MLP neurons only at 0.80x parameters (15,570 of SmolLM2's 30 x 1536 neurons removed),
    # from every block, or with the first / last blocks left whole and the others pruned harder (LLM-Pruner keeps
    # its first and last blocks whole)
    "obs-mlp-0.8x": dict(heads_ratio=0.0, mlp_ratio=519 / 1536, importance="obs"),
    "obs-mlp-0.8x-whole-0+29": dict(heads_ratio=0.0, mlp_ratio=556 / 1536, importance="obs",
                                   ignore=[r"model\.layers\.(0|29)\..*"]),
    "obs-mlp-0.8x-whole-0": dict(heads_ratio=0.0, mlp_ratio=537 / 1536, importance="obs",
                                 ignore=[r"model\.layers\.0\..*"]),
    "obs-mlp-0.8x-whole-29": dict(heads_ratio=0.0, mlp_ratio=537 / 1536, importance="obs",
                                  ignore=[r"model\.layers\.29\..*"]),
    "obs-mlp-0.8x-nonuniform": dict(heads_ratio=0.0, mlp_ratio=519 / 1536, importance="obs", uniform=False),
    "obs-mlp-0.8x-whole-0-2+28-29": dict(heads_ratio=0.0, mlp_ratio=623 / 1536, importance="obs",
                                        ignore=[r"model\.layers\.(0|1|2|28|29)\..*"]),
}
DEFAULT = "obs,wanda,obs-dense,wanda-lstsq,flap,obs-mlp-only,obs-whole-group"


def latency(model, ids, repeats: int) -> float:
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def gen_latency(model, ids, new_tokens: int, repeats: int) -> float:
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=DEFAULT, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--generate", action="store_true", help="also time generation of 64 new tokens")
    parser.add_argument("--append", action="store_true", help="keep the runs already in --output (same dense row)")
    parser.add_argument("--output", default="bench_out/structured_compensation.json")
    args = parser.parse_args()

    import hfprune
    from hfprune.core.calibration import get_calibration_ids
    from hfprune.config import CalibrationConfig
    from hfprune.structured import StructuredConfig

    torch.manual_seed(0)
    tok = hfprune.load_tokenizer(PROTOCOL["model"])
    dense = hfprune.load_model(PROTOCOL["model"], dtype="float32").eval()
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    ids = get_calibration_ids(CalibrationConfig(dataset="c4", nsamples=PROTOCOL["nsamples"], seqlen=PROTOCOL["seqlen"],
                                                seed=PROTOCOL["seed"]), tok)
    eval_ids = hfprune.eval.perplexity.eval_token_ids(tok, "wikitext2")
    lat_ids = eval_ids[:, :512]
    gen_ids = eval_ids[:, 1000:1016]
    commit = git_commit()
    out = {"protocol": {**PROTOCOL, "max_windows": args.max_windows}, "machine": machine(),
           "command": " ".join(sys.argv) + (f" (at {commit})" if commit else ""), "settings": vars(args), "runs": {}}
    previous = json.loads(Path(args.output).read_text()) if args.append and Path(args.output).exists() else None
    if previous is not None:
        out["runs"] = previous["runs"]
        out["commands"] = previous.get("commands", [previous.get("command")]) + [out["command"]]

    def ppl(model):
        return hfprune.perplexity(model, tok, token_ids=eval_ids, seqlen=PROTOCOL["eval_seqlen"],
                                  max_windows=args.max_windows, progress=False)["perplexity"]

    def size_of(model) -> int:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            return sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))

    if "dense" not in out["runs"]:
        dense_row = {"params": unique_params(dense), "safetensors_bytes": size_of(dense), "perplexity": ppl(dense),
                     "forward_512_s": latency(dense, lat_ids, args.repeats)}
        if args.generate:
            dense_row["generate_64_s"] = gen_latency(dense, gen_ids, 64, max(1, args.repeats // 2))
        out["runs"]["dense"] = dense_row
        print("dense", dense_row, flush=True)
        write_json(Path(args.output), out)
    dense_row = out["runs"]["dense"]

    for name in args.variants.split(","):
        model = hfprune.load_model(PROTOCOL["model"], dtype="float32").eval()
        model.load_state_dict(state)
        cfg = StructuredConfig(**VARIANTS[name])
        report = hfprune.prune(model, tok, cfg, calibration=ids, progress=False)
        blocks = report.structured["blocks"]
        row = {"config": cfg.to_dict(), "prune_seconds": report.prune_seconds, "params": unique_params(model),
               "reload_with": report.structured["reload_with"], "compensation": report.structured["compensation"],
               "heads_after": blocks[0]["heads_after"], "kv_heads_after": blocks[0]["kv_heads_after"],
               "neurons_after": [b["neurons_after"] for b in blocks],
               "safetensors_bytes": size_of(model), "perplexity": ppl(model)}
        for key in ("o_error_dropped", "o_error", "down_error_dropped", "down_error"):
            values = [b[key] for b in blocks if key in b]
            if values:  # relative output error of the layer on the calibration inputs, mean over blocks
                row[f"mean_{key}"] = sum(values) / len(values)
        row["params_ratio"] = row["params"] / dense_row["params"]
        non_embedding_dense = dense_row["params"] - dense.get_input_embeddings().weight.numel()
        row["removed_fraction_non_embedding"] = (dense_row["params"] - row["params"]) / non_embedding_dense
        row["ideal_speedup"] = dense_row["params"] / row["params"]
        row["forward_512_s"] = latency(model, lat_ids, args.repeats)
        # dense latency again right after, so drift on a shared machine shows up; the speedup uses it
        row["dense_forward_512_s_recheck"] = latency(dense, lat_ids, args.repeats)
        row["forward_speedup"] = row["dense_forward_512_s_recheck"] / row["forward_512_s"]
        row["forward_speedup_over_ideal"] = row["forward_speedup"] / row["ideal_speedup"]
        if args.generate and "generate_64_s" in dense_row:
            row["generate_64_s"] = gen_latency(model, gen_ids, 64, max(1, args.repeats // 2))
            row["generate_speedup"] = dense_row["generate_64_s"] / row["generate_64_s"]
        if row["reload_with"] == "transformers":
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                with torch.no_grad():
                    ref = model(input_ids=lat_ids[:, :64]).logits
                torch.save(ref, Path(tmp) / "ref_logits.pt")
                code = ("import sys, torch; from transformers import AutoModelForCausalLM as A; "
                        "m = A.from_pretrained(sys.argv[1]).eval(); ids = torch.tensor([[int(t) for t in sys.argv[2].split(',')]]); "
                        "ref = torch.load(sys.argv[1] + '/ref_logits.pt'); "
                        "d = (m(input_ids=ids).logits - ref).abs().max().item(); "
                        "print('hfprune' in sys.modules, m.config.num_attention_heads, m.config.num_key_value_heads, "
                        "m.config.intermediate_size, d)")
                proc = subprocess.run([sys.executable, "-c", code, tmp, ",".join(map(str, lat_ids[0, :64].tolist()))],
                                      capture_output=True, text=True)
                row["stock_reload_fresh_process"] = proc.stdout.strip() or proc.stderr[-500:]
        out["runs"][name] = row
        print(name, {k: v for k, v in row.items() if k not in ("config", "neurons_after")}, flush=True)
        write_json(Path(args.output), out)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
