"""The main demo: prune SmolLM2-135M with Wanda 50 % (unstructured) and Wanda 2:4, report sparsity,
prune time and perplexity before/after, and save both checkpoints.

    make demo                      # or: .venv/bin/python scripts/demo.py --max-windows 32
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import hfprune
from hfprune.card import write_model_card
from hfprune.io import save_pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--patterns", default="unstructured,2:4", help="Comma list; each is pruned from the dense model.")
    parser.add_argument("--sparsity", type=float, default=0.5, help="For unstructured patterns.")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=8, help="WikiText-2 windows (32 for the benchmark protocol).")
    parser.add_argument("--output-dir", default="out", help="Checkpoints go to OUTPUT_DIR/<model>-wanda-<pattern>.")
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
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    summary = []
    for pattern in args.patterns.split(","):
        model.load_state_dict(dense_state)
        if pattern == "unstructured":
            config = hfprune.WandaConfig(sparsity=args.sparsity)
            tag = f"{round(args.sparsity * 100)}"
        else:
            config = hfprune.WandaConfig(pattern=pattern)
            tag = pattern.replace(":", "of")
        print(f"\n== Wanda {config.pattern}, sparsity {config.sparsity:g} ==")
        report = hfprune.prune(model, tokenizer, config, calibration="c4", nsamples=args.nsamples, seqlen=args.seqlen)
        print(report)
        pruned = hfprune.perplexity(model, tokenizer, "wikitext2", **eval_kw)
        print(f"pruned perplexity: {pruned['perplexity']:.2f} (dense {dense['perplexity']:.2f})")

        output = Path(args.output_dir) / f"{Path(args.model).name}-wanda-{tag}"
        results = {"dense_perplexity": dense["perplexity"], "pruned_perplexity": pruned["perplexity"],
                   "eval": {k: dense[k] for k in ("dataset", "seqlen", "windows", "tokens")}}
        save_pruned(model, output, tokenizer=tokenizer, report=report, overwrite=True,
                    extra_files={"eval_results.json": results})
        write_model_card(output, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                         pruning_config=model.config.pruning_config, report=report.to_dict(),
                         eval_results={"perplexity_before": dense["perplexity"], "perplexity_after": pruned["perplexity"],
                                       "dataset": "wikitext2", "seqlen": args.eval_seqlen, "windows": dense["windows"]},
                         command="make demo")
        print(f"saved to {output} (reload: AutoModelForCausalLM.from_pretrained({str(output)!r}))")
        summary.append({"pattern": config.pattern, "sparsity": report.sparsity,
                        "prune_seconds": round(report.prune_seconds, 1), "peak_rss_mb": round(report.peak_rss_mb),
                        "output": str(output), **results})

    print(f"\n{'pattern':<14}{'sparsity':>10}{'prune s':>10}{'ppl before':>12}{'ppl after':>11}")
    for row in summary:
        print(f"{row['pattern']:<14}{row['sparsity']:>10.4f}{row['prune_seconds']:>10.1f}"
              f"{row['dense_perplexity']:>12.2f}{row['pruned_perplexity']:>11.2f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
