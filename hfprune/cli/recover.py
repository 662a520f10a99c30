"""``hfprune recover``: one flag per :class:`~hfprune.workflows.recovery.RecoveryArguments` field."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys

from hfprune.cli.flags import add_fields, local_config
from hfprune.report import PruneReport
# The training code (Trainer, peft) is imported only when the command runs: every command builds this parser.
from hfprune.workflows.recovery_args import RecoveryArguments, arguments_from

logger = logging.getLogger(__name__)


def add_cli(subparsers):
    """Add ``hfprune recover`` to an argparse ``subparsers`` object (one flag per
    :class:`RecoveryArguments` field, ``--recipe``); returns the parser. Its ``func`` default
    takes the parsed args and returns an exit code."""
    parser = subparsers.add_parser(
        "recover", help="Fine-tune a pruned model to recover quality, keeping its zeros.",
        description="Recovery fine-tuning (full or LoRA, optional distillation) of a pruned causal LM on packed "
                    "token windows; pruned weights stay exactly zero. Flags override --recipe values.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--recipe", help="YAML file with RecoveryArguments keys (flags override it).")
    add_fields(parser, RecoveryArguments, default=argparse.SUPPRESS, show_default=True,
               flags={"learning_rate": ["--learning-rate", "--lr"],
                      "per_device_train_batch_size": ["--per-device-train-batch-size", "--batch-size"]},
               extra={"model": {"metavar": "DIR"}})
    parser.set_defaults(func=_cmd_recover)
    return parser


def _cmd_recover(ns) -> int:
    from hfprune.arch import check_seqlen
    from hfprune.io import check_output_dir
    from hfprune.models import command_inputs, load_model, load_tokenizer
    from hfprune.recipes import read_recipe
    from hfprune.workflows.recovery import recover

    names = {f.name for f in dataclasses.fields(RecoveryArguments)}
    recipe = read_recipe(ns.recipe) if getattr(ns, "recipe", None) else {}
    args = arguments_from(recipe, {k: v for k, v in vars(ns).items() if k in names})
    if not args.model:
        raise ValueError("Pass the pruned model: --model DIR (or `model:` in the recipe).")
    if not args.output:
        raise ValueError("Pass an output folder: --output OUT.")
    inputs = command_inputs(args.model, args.teacher, args.dataset, args.eval_dataset, getattr(ns, "recipe", None))
    check_output_dir(args.output, args.overwrite, inputs)  # before loading anything
    config = local_config(args.model)
    if config is not None:  # window lengths against the model's positions, before its weights load
        check_seqlen(config, args.seqlen, "The training seqlen (--seqlen)")
        if args.eval_enabled and args.eval_seqlen is not None:
            check_seqlen(config, args.eval_seqlen, "The evaluation seqlen (--eval-seqlen)")

    model = load_model(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    teacher = None
    if args.distill:
        record = PruneReport.from_model(model)
        name = args.teacher or (record.base_model if record is not None else None)
        if not name:
            folder = (record.config.get("base_model_folder") if record is not None else None)
            where = (f" (it was pruned from a local folder named `{folder}`; config.json keeps no local paths)"
                     if folder else "")
            raise ValueError(f"--distill needs the dense teacher: pass --teacher DIR (the model before pruning){where}.")
        teacher = load_model(name, dtype=args.dtype)
    result = recover(model, tokenizer, args, teacher=teacher)
    argv = getattr(ns, "argv", None)
    if argv is not None:
        logger.debug("command: hfprune %s", " ".join(shlex.quote(a) for a in argv))
    evals = result["evals"]
    ppl = ""
    if evals:
        ppl = f"; perplexity {evals[0]['perplexity']:.3f} -> {evals[-1]['perplexity']:.3f}"
    sys.stdout.write(f"recovered {result['steps']} steps in {result['seconds']:.1f}s; sparsity "
                     f"{result['sparsity_before']:.4f} -> {result['sparsity_after']:.4f}{ppl}\n"
                     f"saved to {args.output}\n")
    return 0
