"""``hfprune zeroshot``."""

from __future__ import annotations

import json
import sys

from hfprune.cli.flags import model_command, positive_int
from hfprune.eval.cloze import cloze_task, load_task_file, task_items, zeroshot_accuracy
from hfprune.models import load_model, load_tokenizer


def _at_least_two(text: str) -> int:
    import argparse

    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{value} must be at least 2 (a question needs two choices)")
    return value


def add_cli(subparsers):
    """Add the ``zeroshot`` subcommand; its ``func`` returns an exit code."""
    p = model_command(
        subparsers, "zeroshot", help="Zero-shot multiple-choice accuracy by log-likelihood.",
        description="Score each choice by the log-likelihood of its tokens after the prompt; report acc and "
                    "acc_norm (divided by the choice's length in characters). The cloze task is a synthetic offline "
                    "task built from local text (--source; see hfprune.eval.cloze.build_cloze_task).")
    p.add_argument("--task", default="cloze", help="cloze, or a local .json/.jsonl file of items.")
    p.add_argument("--source", default="wikitext2",
                   help="Text the cloze items are built from: wikitext2 (test split), c4 (train documents) or a "
                        "local text file.")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--choices-field", default="choices")
    p.add_argument("--label-field", default="label", help="Index of the right choice, or its text.")
    p.add_argument("--limit", type=positive_int, default=None, help="Score the first N items (cloze tasks: build N items, default 500).")
    p.add_argument("--n-choices", type=_at_least_two, default=4, help="Choices per cloze item.")
    p.add_argument("--seed", type=int, default=0, help="Cloze item sampling seed.")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--dtype", default=None, help="auto (the checkpoint's), float32, bfloat16 or float16.")
    p.add_argument("--json", action="store_true", help="Print one JSON object.")
    p.add_argument("--output", help="Also write the JSON result to this file (not overwritten unless --overwrite).")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace an existing --output file that hfprune wrote (never an input or a model's file).")
    p.set_defaults(func=_run_zeroshot)
    return p


def _run_zeroshot(args) -> int:
    task = args.task
    if args.output is not None:  # before the model loads
        from hfprune.io import check_output_file
        from hfprune.models import command_inputs

        check_output_file(args.output, args.overwrite, command_inputs(args.model, args.source if task == "cloze" else task))
    if task == "cloze":
        items = cloze_task(args.source, n_items=args.limit or 500, n_choices=args.n_choices, seed=args.seed)
    else:
        items = load_task_file(task)
        # bad fields or labels fail here, before the model is loaded
        task_items(items, args.prompt_field, args.choices_field, args.label_field, None, args.limit)
    model = load_model(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    result = zeroshot_accuracy(model, tokenizer, items, prompt_field=args.prompt_field,
                               choices_field=args.choices_field, label_field=args.label_field, limit=args.limit,
                               batch_size=args.batch_size, progress=sys.stderr.isatty() and not args.json)
    result["task"] = task
    if task == "cloze":
        result["source"] = args.source
    if args.output is not None:
        from hfprune.fs import write_json_output

        result = write_json_output(args.output, result, default=str)  # printed as written
    if args.json:
        print(json.dumps(result))
    else:
        name = f"cloze ({args.source})" if task == "cloze" else task
        print(f"{name}: acc {result['acc']:.4f} (+/- {result['acc_stderr']:.4f}), acc_norm {result['acc_norm']:.4f} "
              f"over {result['n']} items, {result['seconds']:.1f} s")
    return 0
