"""``hfprune sweep`` and ``hfprune search``."""

from __future__ import annotations

import json
import sys

from hfprune.cli.flags import model_command, positive_int
from hfprune.workflows.sweep import format_probes, format_table, search, sweep


def _command(subparsers, name: str, **kw):
    """The ``sweep`` / ``search`` parser ``name`` with the flags both take."""
    p = model_command(subparsers, name, **kw)
    p.add_argument("--calibration", default="c4", help="c4, wikitext2, self, or a data file (drawn once, reused).")
    p.add_argument("--nsamples", type=positive_int, default=None, help="Calibration windows (default 128).")
    p.add_argument("--seqlen", type=positive_int, default=None, help="Tokens per calibration window (default 2048).")
    p.add_argument("--seed", type=int, default=None, help="Calibration sampling seed (default 0).")
    p.add_argument("--eval-dataset", default="wikitext2", help="wikitext2, c4, or a text file.")
    p.add_argument("--eval-seqlen", type=positive_int, default=None,
                   help="Evaluation window length (default 2048, or the model's positions when fewer).")
    p.add_argument("--max-windows", type=positive_int, default=None,
                   help="Evaluate only the first K windows (all by default; a few to fit CPU time).")
    p.add_argument("--dtype", default=None, help="auto (the checkpoint's), float32, bfloat16 or float16.")
    p.add_argument("--output", required=True, help="Results folder (resumed unless --overwrite).")
    p.add_argument("--overwrite", action="store_true", help="Discard results already in --output.")
    p.add_argument("--tasks", help="Also score lm-evaluation-harness zero-shot tasks / suites at every point "
                                   "(e.g. paper-7; see `hfprune eval --tasks`).")
    p.add_argument("--task-limit", dest="task_limit", type=positive_int, default=None,
                   help="With --tasks: first N documents per task (CPU time).")
    return p


def add_cli(subparsers):
    """Add the ``sweep`` and ``search`` subcommands; their ``func`` returns an exit code."""
    p = _command(subparsers, "sweep", help="Perplexity over methods x patterns x sparsities.",
                 description="Prune the same dense model at every grid point (N:M patterns once per method), measure "
                             "perplexity, and write results.jsonl/csv/json and sweep.png to --output. An interrupted "
                             "sweep resumes where it stopped.")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt", help="Comma-separated methods.")
    p.add_argument("--sparsities", default="0.3,0.4,0.5,0.6,0.7", help="Comma-separated unstructured sparsities.")
    p.add_argument("--patterns", default="unstructured", help="Comma-separated patterns, e.g. unstructured,2:4.")
    p.add_argument("--no-plot", action="store_true", help="Skip sweep.png.")
    p.set_defaults(func=_run_sweep)

    s = _command(subparsers, "search", help="Highest sparsity within a perplexity budget.",
                 description="Bisection over the unstructured sparsity of one method: probes 0 (dense), --lo and "
                             "--hi, widens or narrows the range, then halves it until it is narrower than --tol.")
    s.add_argument("--method", default="wanda")
    budget = s.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-ppl-increase", type=float, help="Relative budget over dense, e.g. 0.1 for +10 %%.")
    budget.add_argument("--max-ppl", type=float, help="Absolute perplexity budget.")
    budget.add_argument("--max-acc-drop", dest="max_acc_drop", type=float,
                        help="Zero-shot budget: mean acc over --tasks at most this far below dense (0.02 = 2 points).")
    s.add_argument("--pattern", default="unstructured", help="Only unstructured can be searched.")
    s.add_argument("--lo", type=float, default=0.3)
    s.add_argument("--hi", type=float, default=0.7)
    s.add_argument("--tol", type=float, default=0.02)
    s.add_argument("--json", action="store_true", help="Print the result as one JSON object.")
    s.set_defaults(func=_run_search)
    return p


def _run_sweep(args) -> int:
    rows = sweep(args.model, args.methods, args.sparsities, args.patterns, calibration=args.calibration,
                 nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, eval_dataset=args.eval_dataset,
                 eval_seqlen=args.eval_seqlen, max_windows=args.max_windows, output_dir=args.output,
                 overwrite=args.overwrite, progress=sys.stderr.isatty(), dtype=args.dtype, plot=not args.no_plot,
                 tasks=args.tasks, task_limit=args.task_limit)
    print(format_table(rows))
    print(f"results in {args.output}")
    return 0


def _run_search(args) -> int:
    result = search(args.model, method=args.method, max_ppl_increase=args.max_ppl_increase, max_ppl=args.max_ppl,
                    pattern=args.pattern, lo=args.lo, hi=args.hi, tol=args.tol, calibration=args.calibration,
                    nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, eval_dataset=args.eval_dataset,
                    eval_seqlen=args.eval_seqlen, max_windows=args.max_windows, output_dir=args.output,
                    overwrite=args.overwrite, progress=sys.stderr.isatty() and not args.json, dtype=args.dtype,
                    max_acc_drop=args.max_acc_drop, tasks=args.tasks, task_limit=args.task_limit)
    if args.json:
        print(json.dumps(result, default=str))
        return 0
    print(format_probes(result))
    acc = result.get("budget_metric") == "zeroshot_acc"
    name, key = ("zero-shot acc", "zeroshot_acc") if acc else ("perplexity", "perplexity")
    budget = result["budget_acc"] if acc else result["budget_ppl"]
    dense = result["dense_zeroshot_acc"] if acc else result["dense_perplexity"]
    if result["sparsity"] is None:
        print(f"even the dense model ({name} {dense:.3f}) is over the budget {budget:.3f}")
    else:
        print(f"{args.method}: highest sparsity within budget {result['sparsity']:.4f} ({name} "
              f"{result[key]:.3f}, budget {budget:.3f}, dense {dense:.3f})")
    print(f"probes in {args.output}")
    return 0
