"""Choosing the ratio on SmolLM2-135M: a perplexity sweep, a budget search, and zero-shot accuracy.

Protocol (the other benchmarks' one): fp32, calibration C4 64 x 512 tokens seed 0 (drawn once and
reused by every run), evaluation WikiText-2 test with seqlen 2048. Only the first ``--max-windows``
windows (default 8 of about 140, i.e. 16k tokens) are evaluated so that the ~19 sweep points fit
CPU time; perplexities are therefore a little different from full-test-set numbers, but every
point uses the same windows, so they compare with each other. Pass ``--max-windows 0`` for all.

Parts (``--parts``, comma-separated, default all):

* ``sweep``: magnitude, wanda, sparsegpt x 0.3..0.7 unstructured + 2:4 (once per method), dense
  first -> ``<out>/sweep/results.{jsonl,csv,json}``, ``sweep.png`` (copied to ``docs/img/sweep.png``)
  and the table ``<out>/sweep.md``. Interrupted? Run it again: finished points are skipped.
* ``search``: highest wanda unstructured sparsity within +10 % perplexity (bisection, every probe
  listed) -> ``<out>/search/search.{jsonl,json}`` and ``<out>/search.md``.
* ``zeroshot``: accuracy on the synthetic cloze task built from WikiText-2 test sentences
  (``hfprune.eval.cloze.build_cloze_task``; no published benchmark) for dense vs wanda 50 %, plus a few
  greedy generations before/after -> ``<out>/zeroshot.json`` and ``<out>/zeroshot.md``.

    .venv/bin/python scripts/bench_sweep.py                                 # everything (tens of minutes on CPU)
    .venv/bin/python scripts/bench_sweep.py --parts search,zeroshot
    .venv/bin/python scripts/bench_sweep.py --parts sweep --methods magnitude --sparsities 0.5 \\
        --max-windows 1 --nsamples 4 --seqlen 64 --out /tmp/smoke --docs-img ''   # smoke run
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import PROTOCOL, machine, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARTS = ("sweep", "search", "zeroshot")
PROMPTS = ["The capital of France is", "Pruning a neural network means", "Once upon a time, a small robot"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help="Comma-separated subset of sweep,search,zeroshot.")
    p.add_argument("--model", default=PROTOCOL["model"])
    p.add_argument("--dtype", default=PROTOCOL["dtype"])
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--sparsities", default="0.3,0.4,0.5,0.6,0.7")
    p.add_argument("--patterns", default="unstructured,2:4")
    p.add_argument("--calibration", default=PROTOCOL["calibration"])
    p.add_argument("--nsamples", type=int, default=PROTOCOL["nsamples"])
    p.add_argument("--seqlen", type=int, default=PROTOCOL["seqlen"])
    p.add_argument("--seed", type=int, default=PROTOCOL["seed"])
    p.add_argument("--eval-dataset", default=PROTOCOL["eval_dataset"])
    p.add_argument("--eval-seqlen", type=int, default=PROTOCOL["eval_seqlen"])
    p.add_argument("--max-windows", type=int, default=8,
                   help="First K evaluation windows (default 8 to fit CPU time; 0 = the whole test set).")
    p.add_argument("--out", default=str(REPO / "bench_out"), help="Output folder.")
    p.add_argument("--docs-img", default=str(REPO / "docs" / "img" / "sweep.png"),
                   help="Where to copy the plot ('' to skip).")
    p.add_argument("--overwrite", action="store_true", help="Discard earlier sweep/search results instead of resuming.")
    p.add_argument("--search-method", default="wanda")
    p.add_argument("--budget", type=float, default=0.1, help="Search: relative perplexity budget over dense.")
    p.add_argument("--tol", type=float, default=0.02, help="Search: bracket width to stop at.")
    p.add_argument("--zeroshot-items", type=int, default=300, help="Cloze items (4 choices each).")
    p.add_argument("--zeroshot-method", default="wanda")
    p.add_argument("--zeroshot-sparsity", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=24, help="Generation samples: new tokens per prompt.")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {unknown}: use {','.join(PARTS)}")
    if args.max_windows == 0:
        args.max_windows = None
    return args


def run_sweep(args, model, tok, ids, out: Path) -> dict:
    from hfprune.workflows.sweep import format_table, sweep

    start = time.perf_counter()
    rows = sweep(model, args.methods, args.sparsities, args.patterns, tokenizer=tok, calibration=ids,
                 eval_dataset=args.eval_dataset, eval_seqlen=args.eval_seqlen, max_windows=args.max_windows,
                 output_dir=out / "sweep", overwrite=args.overwrite, progress=True)
    table = format_table(rows)
    header = (f"# Perplexity vs sparsity: {args.model}\n\n"
              f"Calibration {args.calibration} {args.nsamples} x {args.seqlen} tokens, seed {args.seed} (same ids for "
              f"every point); evaluation {args.eval_dataset} seqlen {args.eval_seqlen}, "
              f"{'all' if args.max_windows is None else f'first {args.max_windows}'} windows. "
              f"N:M points ignore the sparsity list. Plot: `sweep/sweep.png`.\n\n")
    (out / "sweep.md").write_text(header + table + "\n")
    if args.docs_img:
        dest = Path(args.docs_img)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "sweep" / "sweep.png", dest)
    print(table)
    return {"points": len(rows), "seconds": time.perf_counter() - start}


def run_search(args, model, tok, ids, out: Path) -> dict:
    from hfprune.workflows.sweep import format_probes, search

    result = search(model, tok, args.search_method, max_ppl_increase=args.budget, tol=args.tol, calibration=ids,
                    eval_dataset=args.eval_dataset, eval_seqlen=args.eval_seqlen, max_windows=args.max_windows,
                    output_dir=out / "search", overwrite=args.overwrite, progress=True)
    summary = (f"{args.search_method} unstructured: highest sparsity within +{100 * args.budget:.0f} % perplexity = "
               f"{result['sparsity']} (perplexity {result['perplexity']}, dense {result['dense_perplexity']:.3f}, "
               f"budget {result['budget_ppl']:.3f}; first probe over budget {result['first_over_budget']}; "
               f"{result['evaluations']} evaluations)")
    (out / "search.md").write_text(f"# Sparsity search\n\n{summary}\n\n{format_probes(result)}\n")
    print(format_probes(result))
    print(summary)
    return {"sparsity": result["sparsity"], "evaluations": result["evaluations"], "seconds": result["seconds"]}


def run_zeroshot(args, model, tok, ids, out: Path) -> dict:
    import hfprune
    from hfprune.eval.cloze import cloze_task, generation_samples, zeroshot_accuracy

    items = cloze_task("wikitext2", n_items=args.zeroshot_items, n_choices=4, seed=args.seed)
    dense = zeroshot_accuracy(model, tok, items, progress=True)
    dense_gen = generation_samples(model, tok, PROMPTS, args.max_new_tokens)
    config = hfprune.PruningConfig.from_dict({"method": args.zeroshot_method, "sparsity": args.zeroshot_sparsity})
    report = hfprune.prune(model, tok, config, calibration=ids, progress=False)
    pruned = zeroshot_accuracy(model, tok, items, progress=True)
    pruned_gen = generation_samples(model, tok, PROMPTS, args.max_new_tokens)
    label = f"{args.zeroshot_method} {100 * args.zeroshot_sparsity:.0f} %"
    result = {"task": "cloze, source wikitext2 (synthetic: sentence start -> true ending vs 3 endings of other sentences)",
              "items": len(items), "chance": 0.25, "dense": dense, "pruned": pruned, "pruned_label": label,
              "achieved_sparsity": report.sparsity,
              "generations": [{"prompt": d["prompt"], "dense": d["completion"], "pruned": p["completion"]}
                              for d, p in zip(dense_gen, pruned_gen)]}
    write_json(out / "zeroshot.json", result)
    lines = [f"# Zero-shot cloze accuracy (synthetic task, {len(items)} items, 4 choices, chance 25 %)\n",
             "| model | acc | acc_norm |", "|---|---:|---:|",
             f"| dense | {dense['acc']:.4f} +/- {dense['acc_stderr']:.4f} | {dense['acc_norm']:.4f} |",
             f"| {label} | {pruned['acc']:.4f} +/- {pruned['acc_stderr']:.4f} | {pruned['acc_norm']:.4f} |", "",
             "## Greedy generations", ""]
    for g in result["generations"]:
        lines += [f"- **{g['prompt']}**", f"  - dense: {g['dense']!r}", f"  - {label}: {g['pruned']!r}"]
    (out / "zeroshot.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"dense_acc": dense["acc"], "pruned_acc": pruned["acc"]}


def main(argv=None) -> int:
    import logging

    import torch

    import hfprune
    from hfprune.core.calibration import get_calibration_ids
    from hfprune.config import CalibrationConfig

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = hfprune.load_model(args.model, dtype=args.dtype)
    tok = hfprune.load_tokenizer(args.model)
    ids = get_calibration_ids(CalibrationConfig(dataset=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                                                seed=args.seed), tok)
    summary = {"machine": machine(), "command": " ".join(sys.argv), "args": {k: v for k, v in vars(args).items()}}
    runners = {"sweep": run_sweep, "search": run_search, "zeroshot": run_zeroshot}
    for part in PARTS:  # zeroshot prunes the model in place, so it runs last
        if part in args.parts:
            start = time.perf_counter()
            summary[part] = runners[part](args, model, tok, ids, out)
            summary[part]["wall_seconds"] = time.perf_counter() - start
    write_json(out / "bench_sweep.json", summary)
    print(f"outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
