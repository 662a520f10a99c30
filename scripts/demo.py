"""The main demo: prune SmolLM2-135M with Wanda 2:4 (50 %), report sparsity, time and perplexity, save it.

    make demo                      # or: .venv/bin/python scripts/demo.py --max-windows 32
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import hfprune
from hfprune.card import write_model_card
from hfprune.io import save_pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=8, help="WikiText-2 windows (32 for the benchmark protocol).")
    parser.add_argument("--output", default="out/smollm2-135m-wanda-2of4")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    t0 = time.perf_counter()
    model = hfprune.load_model(args.model)
    tokenizer = hfprune.load_tokenizer(args.model)
    print(f"loaded {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{model.dtype}) in {time.perf_counter() - t0:.1f} s")

    eval_kw = dict(seqlen=args.eval_seqlen, max_windows=args.max_windows)
    dense = hfprune.perplexity(model, tokenizer, "wikitext2", **eval_kw)
    print(f"dense perplexity (WikiText-2, {dense['windows']} x {dense['seqlen']} tokens): {dense['perplexity']:.2f}")

    config = hfprune.WandaConfig(pattern=args.pattern)
    report = hfprune.prune(model, tokenizer, config, calibration="c4", nsamples=args.nsamples, seqlen=args.seqlen)
    print(report)

    pruned = hfprune.perplexity(model, tokenizer, "wikitext2", **eval_kw)
    print(f"pruned perplexity: {pruned['perplexity']:.2f} (dense {dense['perplexity']:.2f})")

    results = {"dense_perplexity": dense["perplexity"], "pruned_perplexity": pruned["perplexity"],
               "eval": {k: dense[k] for k in ("dataset", "seqlen", "windows", "tokens")}}
    save_pruned(model, args.output, tokenizer=tokenizer, report=report, overwrite=True,
                extra_files={"eval_results.json": results})
    write_model_card(args.output, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                     pruning_config=model.config.pruning_config, report=report.to_dict(),
                     eval_results={"perplexity_before": dense["perplexity"], "perplexity_after": pruned["perplexity"],
                                   "dataset": "wikitext2", "seqlen": args.eval_seqlen, "windows": dense["windows"]},
                     command="make demo")
    print(f"saved to {args.output} (reload: AutoModelForCausalLM.from_pretrained({args.output!r}))")
    print(json.dumps({"sparsity": report.sparsity, "prune_seconds": round(report.prune_seconds, 1),
                      "peak_rss_mb": round(report.peak_rss_mb), **results}))


if __name__ == "__main__":
    main()
