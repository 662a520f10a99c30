"""The ``hfprune`` command line: ``prune``, ``eval`` and ``methods``."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

logger = logging.getLogger("hfprune.cli")


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="Prune a model and save it.",
                       description="Prune a causal LM one decoder block at a time and save a standard checkpoint.")
    p.add_argument("--model", required=True, help="Local checkpoint folder, Hub id, or alias (smollm2-135m).")
    p.add_argument("--recipe", help="YAML recipe (recipes/*.yaml); the flags below override its values.")
    p.add_argument("--method", help="Pruning method (see `hfprune methods`).")
    p.add_argument("--sparsity", type=float, help="Fraction of weights removed per layer, in [0, 1).")
    p.add_argument("--pattern", help="'unstructured' or N:M such as 2:4.")
    p.add_argument("--scope", choices=["row", "layer", "global"], help="Comparison group for unstructured masks.")
    p.add_argument("--targets", nargs="+", help="Regexes of linear layers to prune (default: all in the decoder blocks).")
    p.add_argument("--ignore", nargs="+", help="Regexes of linear layers to keep dense.")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, dest="true_sequential", default=None,
                   help="Prune the layers of a block in call order, each from inputs through the already pruned "
                        "layers (default for sparsegpt); --no-true-sequential scores every layer from the dense "
                        "block's inputs (default for wanda, as in its paper).")
    p.add_argument("--layer-sparsity", dest="layer_sparsity", type=lambda v: [float(x) for x in v.split(",")],
                   help="Comma list with one sparsity per decoder block (non-uniform).")
    p.add_argument("--owl", action="store_true", default=None, help="OWL outlier-weighted per-block sparsity.")
    p.add_argument("--owl-m", type=float, dest="owl_m", help="OWL outlier threshold M (default 5).")
    p.add_argument("--owl-lambda", type=float, dest="owl_lambda", help="OWL sparsity range lambda (default 0.08).")
    p.add_argument("--block-size", type=int, dest="block_size", help="SparseGPT column block size (default 128).")
    p.add_argument("--dampening", type=float, help="SparseGPT Hessian dampening fraction (default 0.01).")
    p.add_argument("--act-order", action="store_true", dest="act_order", default=None,
                   help="SparseGPT: solve input columns by decreasing Hessian diagonal (N:M: whole groups).")
    p.add_argument("--bits", type=int, choices=[4, 8], help="Quantize kept weights: jointly with sparsegpt, and/or "
                                                           "stored as int8/int4 by --format sparse.")
    p.add_argument("--group-size", type=int, dest="group_size", help="Quantization group size (default: per channel).")
    p.add_argument("--format", choices=["dense", "sparse", "compressed-tensors"], default="dense",
                   help="Checkpoint format: dense save_pretrained, hfprune's compressed sparse format (reloads "
                        "after `import hfprune`), or compressed-tensors int4/int8 for vLLM.")
    p.add_argument("--target", help="Structured pruning: heads, mlp or heads,mlp (physically removes them; "
                                    "--method is then the importance: magnitude, wanda or fluctuation).")
    p.add_argument("--heads-ratio", type=float, dest="heads_ratio", help="Fraction of attention heads removed.")
    p.add_argument("--mlp-ratio", type=float, dest="mlp_ratio", help="Fraction of MLP neurons removed.")
    p.add_argument("--non-uniform", action="store_true", default=None, dest="non_uniform",
                   help="Structured: per-block counts from a global ranking (reload with hfprune).")
    p.add_argument("--gqa-mode", choices=["per_group", "whole_group"], dest="gqa_mode",
                   help="Structured heads with GQA: equal query heads per KV group, or whole KV groups.")
    p.add_argument("--bias-compensation", action="store_true", default=None, dest="bias_compensation",
                   help="Structured: FLAP bias compensation for removed channels.")
    p.add_argument("--calibration", help="c4, wikitext2, self, a data file, or a Hub data set name.")
    p.add_argument("--nsamples", type=int, help="Calibration windows (default 128).")
    p.add_argument("--seqlen", type=int, help="Tokens per calibration window (default 2048).")
    p.add_argument("--seed", type=int, help="Calibration sampling seed (default 0).")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="Calibration windows per block call (default: chosen from memory and pass count; see CalibrationConfig.batch_size).")
    p.add_argument("--split", help="Calibration data set split (default train).")
    p.add_argument("--text-column", dest="text_column", help="Calibration text column (default text).")
    p.add_argument("--dtype", default=None, help="auto (the checkpoint's), float32, bfloat16 or float16.")
    p.add_argument("--output", required=True, help="Output folder for the pruned checkpoint.")
    p.add_argument("--overwrite", action="store_true", help="Replace a non-empty output folder.")
    p.add_argument("--low-memory", action="store_true", dest="low_memory",
                   help="Stream a local safetensors checkpoint: keep the decoder blocks on disk, prune one at a time "
                        "and write the output shards block by block (peak RAM about one block + activations).")
    p.add_argument("--resume", action="store_true",
                   help="Continue an interrupted run into the same --output (same command otherwise).")
    p.add_argument("--eval", action="store_true", help="Also measure WikiText-2 perplexity before and after pruning "
                                                       "(recorded in eval_results.json and the model card).")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--eval-tasks", dest="eval_tasks",
                   help="Also score zero-shot tasks / suites (e.g. paper-7) before and after pruning through "
                        "lm-evaluation-harness (see `hfprune eval --tasks`); recorded like --eval.")
    p.add_argument("--eval-limit", dest="eval_limit", type=int, default=None,
                   help="With --eval-tasks: first N documents per task.")
    p.set_defaults(func=_run_prune)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="Measure perplexity with the pinned protocol, or zero-shot benchmarks (--tasks).",
                       description="Perplexity (papers' protocol) by default; with --tasks, lm-evaluation-harness "
                                   "zero-shot tasks on local data ($HFPRUNE_DATA_DIR/tasks) instead, or as well "
                                   "when --dataset is also given.")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default=None, help="wikitext2 (default without --tasks), c4, a text file, or a Hub "
                                                   "data set name.")
    p.add_argument("--tasks", help="Comma-separated zero-shot tasks or suites: piqa, arc_easy, arc_challenge, "
                                   "winogrande, boolq, openbookqa, rte, lambada_openai, hellaswag (1,000-item "
                                   "subset), hellaswag_full_approx; paper-7, llm-pruner-7.")
    p.add_argument("--limit", type=float, default=None, help="Zero-shot: first N documents per task (quick runs).")
    p.add_argument("--batch-size", dest="batch_size", default="16", help="Zero-shot requests per forward pass, "
                                                                         "or auto.")
    p.add_argument("--num-fewshot", dest="num_fewshot", type=int, default=0)
    p.add_argument("--output", help="Also write the JSON result to this file (not overwritten unless --overwrite).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --output file.")
    p.add_argument("--split", default="test")
    p.add_argument("--text-column", dest="text_column", default="text")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="Evaluate only the first K windows.")
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", action="store_true", help="Print one JSON object.")
    p.set_defaults(func=_run_eval)


def _add_methods(sub) -> None:
    p = sub.add_parser("methods", help="List the pruning methods.")
    p.set_defaults(func=lambda args: print("\n".join(__import__("hfprune").available_methods())) or 0)


def _run_prune(args) -> int:
    import torch  # noqa: F401

    import hfprune
    from hfprune.engine import resolve_calibration
    from hfprune.io import check_output_dir
    from hfprune.recipes import build_configs, read_recipe

    check_output_dir(args.output, args.overwrite)  # fail before the slow part
    if args.eval_tasks:
        from hfprune.eval.harness import check_task_files

        check_task_files(args.eval_tasks)
    data = read_recipe(args.recipe) if args.recipe else {}
    overrides = {"method": args.method, "sparsity": args.sparsity, "pattern": args.pattern, "scope": args.scope,
                 "targets": args.targets, "ignore": args.ignore, "target": args.target, "heads_ratio": args.heads_ratio,
                 "mlp_ratio": args.mlp_ratio, "non_uniform": args.non_uniform, "gqa_mode": args.gqa_mode,
                 "bias_compensation": args.bias_compensation, "true_sequential": args.true_sequential,
                 "layer_sparsity": args.layer_sparsity, "owl": args.owl, "owl_m": args.owl_m,
                 "owl_lambda": args.owl_lambda, "block_size": args.block_size, "dampening": args.dampening,
                 "act_order": args.act_order}
    method = args.method or data.get("method")
    if method == "sparsegpt":
        overrides.update(bits=args.bits, group_size=args.group_size)
    elif args.bits and args.format == "dense":
        raise ValueError("--bits quantizes weights when they are saved with --format sparse or compressed-tensors, "
                         "or jointly with --method sparsegpt: add one of those.")
    if args.pattern and args.pattern != "unstructured" and args.sparsity is None:
        data.pop("sparsity", None)
    calib_overrides = {"dataset": args.calibration, "nsamples": args.nsamples, "seqlen": args.seqlen,
                       "seed": args.seed, "batch_size": args.batch_size, "split": args.split,
                       "text_column": args.text_column}
    config, calibration = build_configs(data, overrides, calib_overrides)
    from hfprune.distributed import requested_cpu_processes, start_cpu_workers

    start_cpu_workers(requested_cpu_processes())  # `accelerate launch --cpu --num_processes N` without mpirun
    if args.low_memory or args.resume:
        from hfprune.streaming import run_cli

        report = run_cli(args, config, resolve_calibration(calibration))
        if report is not None:  # process 0
            print(report)
            print(f"saved to {args.output}")
        return 0
    from hfprune.distributed import get_context

    is_main = get_context().is_main  # under `accelerate launch`, only process 0 evaluates and writes
    model = hfprune.load_model(args.model, dtype=args.dtype)
    tokenizer = hfprune.load_tokenizer(args.model)
    extra = {}
    eval_kw = dict(seqlen=args.eval_seqlen, max_windows=args.max_windows, progress=sys.stderr.isatty())
    zs_kw = dict(tasks=args.eval_tasks, limit=args.eval_limit)
    if args.eval and is_main:
        extra["before"] = hfprune.perplexity(model, tokenizer, "wikitext2", **eval_kw)
    if args.eval_tasks and is_main:
        from hfprune.eval.harness import zeroshot_evaluate

        extra["zeroshot"] = {"before": zeroshot_evaluate(model, tokenizer, **zs_kw)}
    report = hfprune.prune(model, tokenizer, config, resolve_calibration(calibration), progress=sys.stderr.isatty())
    if not is_main:
        return 0
    if args.eval:
        extra["after"] = hfprune.perplexity(model, tokenizer, "wikitext2", **eval_kw)
    if args.eval_tasks:
        extra["zeroshot"]["after"] = zeroshot_evaluate(model, tokenizer, **zs_kw)
    model.config.pruning_config["command"] = "hfprune " + " ".join(shlex.quote(a) for a in args.argv)
    model.config.pruning_config["base_model"] = str(args.model)
    hfprune.save_pretrained(model, args.output, format=args.format,
                            bits=args.bits if args.format != "dense" else None,
                            group_size=args.group_size if args.format != "dense" else None,
                            tokenizer=tokenizer, report=report, eval_results=extra or None, overwrite=args.overwrite)
    print(report)
    if "after" in extra:
        after = extra["after"]
        print(f"perplexity (wikitext2, seqlen {after['seqlen']}, {after['windows']} windows): "
              f"{extra['before']['perplexity']:.3f} -> {after['perplexity']:.3f}")
    print(f"saved to {args.output}")
    return 0


def _run_eval(args) -> int:
    import hfprune

    progress = sys.stderr.isatty() and not args.json
    zeroshot = {}
    if args.tasks:
        from hfprune.eval.harness import check_task_files, expand_tasks

        check_task_files(args.tasks)  # bad names and missing files fail before the model is loaded
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        batch = int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size
        zeroshot = dict(tasks=expand_tasks(args.tasks), limit=limit, batch_size=batch, num_fewshot=args.num_fewshot)
    if args.output:
        from pathlib import Path

        if Path(args.output).exists() and not args.overwrite:
            raise FileExistsError(f"{args.output} exists: pass --overwrite to replace it, or another --output.")
    model = hfprune.load_model(args.model, dtype=args.dtype)
    tokenizer = hfprune.load_tokenizer(args.model)
    result = hfprune.evaluate(model, tokenizer, args.dataset, seqlen=args.seqlen, max_windows=args.max_windows,
                              split=args.split, text_column=args.text_column, progress=progress, **zeroshot)
    result["model"] = str(args.model)
    if args.output:
        from pathlib import Path

        from hfprune.sweep import _write_atomic  # temp file + rename: never a half-written result

        _write_atomic(Path(args.output), json.dumps(result, indent=2, default=str) + "\n")
    if args.json:
        print(json.dumps(result))
        return 0
    if "perplexity" in result:
        print(f"perplexity {result['perplexity']:.4f} over {result['windows']} windows x {result['seqlen']} tokens "
              f"({result['dataset']}); linear-layer sparsity {result['linear_sparsity']:.4f}")
    if "zeroshot" in result:
        from hfprune.eval.harness import format_results

        print(format_results(result["zeroshot"]))
        print(f"linear-layer sparsity {result['linear_sparsity']:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfprune", description="Prune Hugging Face language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    _add_eval(sub)
    _add_methods(sub)
    import importlib

    # Subcommands that live next to their feature: each module has add_cli(subparsers).
    for module_name in ("hfprune.hub", "hfprune.recovery", "hfprune.sweep", "hfprune.zeroshot"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        module.add_cli(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, OSError, RuntimeError, ImportError) as err:
        logger.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
