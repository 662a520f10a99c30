"""Structured pruning of SmolLM2-135M: quality, size, reload and real speedup.

Removes 1 of the 3 KV groups (with their 3 query heads) and 25 % of the MLP neurons of every
block (about 27 % of the non-embedding parameters), with several importance scores, uniform and
non-uniform, and measures: parameters, safetensors bytes, WikiText-2 perplexity (pinned
protocol), forward latency (batch 1, 512 tokens) and generation latency (64 new tokens) of the
pruned model against the dense one in the same process, and a stock `from_pretrained` reload of
the uniform result in a fresh process (no hfprune import).

    .venv/bin/python scripts/bench_structured.py                 # -> bench_out/structured.json
    .venv/bin/python scripts/bench_structured.py --max-windows 8 --variants wanda
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import PROTOCOL, machine, write_json  # noqa: E402

VARIANTS = {
    "magnitude": dict(importance="magnitude"),
    "wanda": dict(importance="wanda"),
    "wanda-bias": dict(importance="wanda", bias_compensation=True),
    "fluctuation-bias": dict(importance="fluctuation", bias_compensation=True),
    "wanda-nonuniform": dict(importance="wanda", uniform=False),
}


def unique_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


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
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--heads-ratio", type=float, default=1 / 3)
    parser.add_argument("--mlp-ratio", type=float, default=0.25)
    parser.add_argument("--gqa-mode", default="whole_group")
    parser.add_argument("--max-windows", type=int, default=PROTOCOL["max_windows"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default="bench_out/structured.json")
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
    out = {"protocol": {**PROTOCOL, "max_windows": args.max_windows}, "machine": machine(),
           "command": " ".join(sys.argv), "settings": vars(args), "runs": {}}

    def ppl(model):
        return hfprune.perplexity(model, tok, token_ids=eval_ids, seqlen=PROTOCOL["eval_seqlen"],
                                  max_windows=args.max_windows, progress=False)["perplexity"]

    def size_of(model) -> int:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            return sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))

    dense_row = {"params": unique_params(dense), "safetensors_bytes": size_of(dense), "perplexity": ppl(dense),
                 "forward_512_s": latency(dense, lat_ids, args.repeats),
                 "generate_64_s": gen_latency(dense, gen_ids, 64, max(1, args.repeats // 2))}
    out["runs"]["dense"] = dense_row
    print("dense", dense_row, flush=True)
    write_json(Path(args.output), out)

    for name in args.variants.split(","):
        model = hfprune.load_model(PROTOCOL["model"], dtype="float32").eval()
        model.load_state_dict(state)
        cfg = StructuredConfig(heads_ratio=args.heads_ratio, mlp_ratio=args.mlp_ratio, gqa_mode=args.gqa_mode,
                               **VARIANTS[name])
        report = hfprune.prune(model, tok, cfg, calibration=ids, progress=False)
        row = {"config": report.config, "prune_seconds": report.prune_seconds, "params": unique_params(model),
               "reload_with": report.structured["reload_with"],
               "heads_after": report.structured["blocks"][0]["heads_after"],
               "kv_heads_after": report.structured["blocks"][0]["kv_heads_after"],
               "neurons_after": [b["neurons_after"] for b in report.structured["blocks"]],
               "safetensors_bytes": size_of(model), "perplexity": ppl(model)}
        non_embedding_dense = dense_row["params"] - dense.get_input_embeddings().weight.numel()
        row["removed_fraction_non_embedding"] = (dense_row["params"] - row["params"]) / non_embedding_dense
        row["ideal_speedup"] = dense_row["params"] / row["params"]
        if cfg.uniform:
            row["forward_512_s"] = latency(model, lat_ids, args.repeats)
            row["generate_64_s"] = gen_latency(model, gen_ids, 64, max(1, args.repeats // 2))
            row["forward_speedup"] = dense_row["forward_512_s"] / row["forward_512_s"]
            row["generate_speedup"] = dense_row["generate_64_s"] / row["generate_64_s"]
            row["forward_speedup_over_ideal"] = row["forward_speedup"] / row["ideal_speedup"]
            # recheck dense latency right after, so drift on a shared machine shows up
            row["dense_forward_512_s_recheck"] = latency(dense, lat_ids, args.repeats)
        if name == "wanda":
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
