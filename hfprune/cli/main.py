"""The ``hfprune`` command line: ``prune``, ``eval`` and ``methods``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import signal
import sys

from hfprune.cli import bench, flow, push, recover, sweep, zeroshot
from hfprune.cli.flags import add_fields, add_method_fields, local_config, model_command, positive_int

logger = logging.getLogger("hfprune.cli")


def _comma_floats(value: str) -> list[float]:
    return [float(x) for x in value.split(",")]


def _add_prune(sub) -> None:
    from hfprune.config import CalibrationConfig, PruningConfig
    from hfprune.formats import FORMATS
    from hfprune.registry import METHODS

    p = model_command(sub, "prune", help="Prune a model and save it.",
                      description="Prune a causal LM one decoder block at a time and save a standard checkpoint.")
    p.add_argument("--recipe", help="YAML recipe (recipes/*.yaml); the flags below override its values. A recipe "
                                    "with `stages:` runs several methods in order.")
    p.add_argument("--method", help="Pruning method (see `hfprune methods`).")
    p.add_argument("--bits", type=int, choices=[4, 8], help="Quantize kept weights: jointly with sparsegpt, and/or "
                                                           "stored as int8/int4 by --format sparse.")
    p.add_argument("--group-size", type=int, dest="group_size", help="Quantization group size (default: per channel).")
    p.add_argument("--format", choices=list(FORMATS), default="dense",
                   help="Checkpoint format: dense save_pretrained, hfprune's compressed sparse format (reloads "
                        "after `import hfprune`), or compressed-tensors int4/int8 for vLLM.")
    p.add_argument("--target", help="Structured pruning the older way: heads, mlp or heads,mlp (physically removes "
                                    "them; --method is then the importance: obs, magnitude, wanda or fluctuation). "
                                    "Same as --method structured --importance ... .")
    p.add_argument("--non-uniform", action="store_true", default=None, dest="non_uniform",
                   help="Structured: per-block counts from a global ranking (reload with hfprune); same as --no-uniform.")
    # Method flags come from every registered method's config (help text in the field metadata): a method
    # registered with @register_pruner gets its flags here with nothing else to edit.
    configs = {"": PruningConfig, **{name: cls.config_cls for name, cls in sorted(METHODS.items())}}
    method_keys = add_method_fields(p, configs, extra={"layer_sparsity": {"type": _comma_floats, "nargs": None}})
    calib_keys = add_fields(p, CalibrationConfig, skip=("config_name",), flags={"dataset": ["--calibration"]})
    p.add_argument("--dtype", default=None, help="auto (the checkpoint's), float32, bfloat16 or float16.")
    p.add_argument("--output", required=True, help="Output folder for the pruned checkpoint.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace an earlier hfprune output in --output (a folder holding other files is refused).")
    p.add_argument("--low-memory", action="store_true", dest="low_memory",
                   help="Stream a local safetensors checkpoint: keep the decoder blocks on disk, prune one at a time "
                        "and write the output shards block by block (peak RAM about one block + activations).")
    p.add_argument("--resume", action="store_true",
                   help="Continue an interrupted run into the same --output (same command otherwise).")
    p.add_argument("--eval", action="store_true", help="Also measure WikiText-2 perplexity before and after pruning "
                                                       "(recorded in eval_results.json and the model card).")
    p.add_argument("--eval-seqlen", type=positive_int, default=None,
                   help="Evaluation window length (default 2048, or the model's positions when fewer).")
    p.add_argument("--max-windows", type=positive_int, default=None)
    p.add_argument("--eval-tasks", dest="eval_tasks",
                   help="Also score zero-shot tasks / suites (e.g. paper-7) before and after pruning through "
                        "lm-evaluation-harness (see `hfprune eval --tasks`); recorded like --eval.")
    p.add_argument("--eval-limit", dest="eval_limit", type=positive_int, default=None,
                   help="With --eval-tasks: first N documents per task.")
    p.set_defaults(func=_run_prune, method_keys=method_keys + ["method", "target", "non_uniform"], calib_keys=calib_keys)


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
    p.add_argument("--num-fewshot", dest="num_fewshot", type=int, default=0,
                   help="Zero-shot: examples shown before each question (0, the default: the papers' protocol).")
    p.add_argument("--output", help="Also write the JSON result to this file (not overwritten unless --overwrite).")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace an existing --output file that hfprune wrote (never an input or a model's file).")
    p.add_argument("--split", default="test")
    p.add_argument("--text-column", dest="text_column", default="text")
    p.add_argument("--seqlen", type=positive_int, default=None,
                   help="Tokens per window (default 2048, or the model's positions when fewer).")
    p.add_argument("--max-windows", type=positive_int, default=None, help="Evaluate only the first K windows.")
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", action="store_true", help="Print one JSON object.")
    p.set_defaults(func=_run_eval)


def _add_methods(sub) -> None:
    p = sub.add_parser("methods", help="List the pruning methods, one line each.")
    p.set_defaults(func=_run_methods)


def _run_methods(args) -> int:
    from hfprune.registry import describe_methods

    rows = describe_methods()
    width = max(len(name) for name in rows)
    for name, line in rows.items():
        print(f"{name:{width}s}  {line}")
    return 0


def _save_args(args) -> tuple:
    """(format, bits, group_size) as saved: with --format dense, --bits means SparseGPT's joint quantization."""
    quantized = args.format != "dense"
    return args.format, args.bits if quantized else None, args.group_size if quantized else None


def _run_prune(args) -> int:
    import torch  # noqa: F401

    from hfprune.core.calibration import resolve_calibration
    from hfprune.io import check_output_dir, check_save_args, output_lock
    from hfprune.models import command_inputs
    from hfprune.recipes import build_configs, read_recipe

    data = read_recipe(args.recipe) if args.recipe else {}
    calib = data.get("calibration")
    recipe_calibration = calib.get("dataset") if isinstance(calib, dict) else None
    task_files = []
    if args.eval_tasks:
        from hfprune.eval.zeroshot import check_task_files

        task_files = [f for files in check_task_files(args.eval_tasks).values() for f in files]
    # never written or replaced by --output, even with --overwrite
    inputs = command_inputs(args.model, args.dataset, args.recipe, recipe_calibration, task_files)
    check_output_dir(args.output, args.overwrite, inputs)  # fail before the slow part
    check_save_args(*_save_args(args))
    overrides = {k: getattr(args, k) for k in args.method_keys}
    method = args.method or data.get("method")
    from hfprune.registry import METHODS

    if method in METHODS and "bits" in METHODS[method].config_cls.field_names() and not args.target:
        overrides.update(bits=args.bits, group_size=args.group_size)
    elif args.bits and args.format == "dense":
        raise ValueError("--bits quantizes weights when they are saved with --format sparse or compressed-tensors, "
                         "or jointly with --method sparsegpt or admm: add one of those.")
    if args.pattern and args.pattern != "unstructured" and args.sparsity is None:
        data.pop("sparsity", None)
    calib_overrides = {k: getattr(args, k) for k in args.calib_keys}
    config, calibration = build_configs(data, overrides, calib_overrides)
    _check_prune_combination(args, config)
    from hfprune.core.distributed import requested_cpu_processes, start_cpu_workers

    start_cpu_workers(requested_cpu_processes())  # `accelerate launch --cpu --num_processes N` without mpirun
    if args.low_memory or args.resume:
        report = _run_streaming(args, config, resolve_calibration(calibration))
        if report is not None:  # process 0
            print(report)
            print(f"saved to {args.output}")
        return 0
    from hfprune.core.distributed import get_context

    is_main = get_context().is_main  # under `accelerate launch`, only process 0 evaluates and writes
    with output_lock(args.output) if is_main else contextlib.nullcontext():
        return _prune_in_memory(args, config, calibration, is_main)


def _check_prune_combination(args, config) -> None:
    """What the input checkpoint cannot go through, from its config.json alone: refused before any weight loads."""
    from hfprune.core.checks import check_checkpoint_combination

    if args.eval_seqlen is not None and args.eval_seqlen < 2:
        raise ValueError(f"--eval-seqlen {args.eval_seqlen} leaves nothing to predict: a window needs at least 2 "
                         f"tokens.")
    model_config = local_config(args.model)
    if model_config is None:
        return
    if getattr(config, "method", None) == "depth":
        check_checkpoint_combination(model_config, "depth")
    if args.low_memory or args.resume:
        check_checkpoint_combination(model_config, "low_memory")


def _needs_tokenizer(args, config, calibration) -> bool:
    """Text calibration and --eval need one; data-free methods and self-generated calibration do not."""
    from hfprune.registry import get_pruner_cls

    calibrated = any(get_pruner_cls(c.method)(c).needs_data for c in (config if isinstance(config, list) else [config]))
    return bool(args.eval) or (calibrated and getattr(calibration, "dataset", None) != "self")


def _prune_in_memory(args, config, calibration, is_main: bool) -> int:
    import hfprune
    from hfprune.core.calibration import resolve_calibration
    from hfprune.io import check_save_args

    model = hfprune.load_model(args.model, dtype=args.dtype)
    check_save_args(*_save_args(args), model=model)  # e.g. a --group-size that does not fit: now, not after pruning
    tokenizer = hfprune.load_tokenizer(args.model, required=_needs_tokenizer(args, config, calibration))
    extra = {}
    eval_kw = dict(seqlen=args.eval_seqlen, max_windows=args.max_windows, progress=sys.stderr.isatty())
    zs_kw = dict(tasks=args.eval_tasks, limit=args.eval_limit)
    if args.eval and is_main:
        extra["before"] = hfprune.perplexity(model, tokenizer, "wikitext2", **eval_kw)
    if args.eval_tasks and is_main:
        from hfprune.eval.zeroshot import zeroshot_evaluate

        extra["zeroshot"] = {"before": zeroshot_evaluate(model, tokenizer, **zs_kw)}
    report = hfprune.prune(model, tokenizer, config, resolve_calibration(calibration), progress=sys.stderr.isatty())
    if not is_main:
        return 0
    if args.eval:
        extra["after"] = hfprune.perplexity(model, tokenizer, "wikitext2", **eval_kw)
    if args.eval_tasks:
        extra["zeroshot"]["after"] = zeroshot_evaluate(model, tokenizer, **zs_kw)
    report.command = "hfprune " + " ".join(shlex.quote(a) for a in args.argv)
    report.base_model = str(args.model)
    fmt, bits, group_size = _save_args(args)
    hfprune.save_pretrained(model, args.output, format=fmt, bits=bits, group_size=group_size, tokenizer=tokenizer,
                            report=report, eval_results=extra or None, overwrite=args.overwrite)
    print(report)
    if "after" in extra:
        after = extra["after"]
        print(f"perplexity (wikitext2, seqlen {after['seqlen']}, {after['windows']} windows): "
              f"{extra['before']['perplexity']:.3f} -> {after['perplexity']:.3f}")
    print(f"saved to {args.output}")
    return 0


def _run_streaming(args, config, calibration):
    """``hfprune prune --low-memory / --resume``: returns the report on process 0, else ``None``."""
    from hfprune.workflows.streaming import prune_checkpoint

    if getattr(args, "format", "dense") != "dense":
        raise ValueError("--low-memory / --resume write dense safetensors shards: drop --format, or convert the "
                         "output afterwards with hfprune.save_pretrained(..., format=...).")
    from hfprune.registry import get_pruner_cls

    if isinstance(config, list):
        raise ValueError("--low-memory / --resume run one method: run a recipe's stages in memory (drop the flag).")
    if getattr(args, "target", None) or get_pruner_cls(config.method).model_level:
        raise ValueError(f"--low-memory / --resume support unstructured and N:M pruning, not structured --target or "
                         f"--method {config.method} (it changes the model's structure in memory).")
    after = None
    if getattr(args, "eval", False):
        def after(model, tokenizer):
            from hfprune.core.distributed import get_context
            from hfprune.eval.perplexity import perplexity

            if not get_context().is_main:
                return {}
            return {"eval_results.json": perplexity(model, tokenizer, "wikitext2", seqlen=args.eval_seqlen,
                                                    max_windows=args.max_windows, progress=sys.stderr.isatty())}
    from hfprune.core.distributed import get_context

    report = prune_checkpoint(args.model, args.output, config, calibration, dtype=args.dtype,
                              low_memory=args.low_memory, resume=args.resume, overwrite=args.overwrite,
                              progress=sys.stderr.isatty(),
                              command="hfprune " + " ".join(shlex.quote(a) for a in args.argv), after_prune=after)
    return report if get_context().is_main else None


def _run_eval(args) -> int:
    import hfprune

    progress = sys.stderr.isatty() and not args.json
    zeroshot = {}
    task_files = []
    if args.tasks:
        from hfprune.eval.zeroshot import check_task_files, check_zeroshot_args, expand_tasks

        # bad names, missing files and bad numbers fail before the model is loaded
        task_files = [f for files in check_task_files(args.tasks).values() for f in files]
        limit, batch, fewshot = check_zeroshot_args(args.limit, args.batch_size, args.num_fewshot)
        zeroshot = dict(tasks=expand_tasks(args.tasks), limit=limit, batch_size=batch, num_fewshot=fewshot)
    else:
        given = [f for f, v, d in (("--limit", args.limit, None), ("--num-fewshot", args.num_fewshot, 0),
                                   ("--batch-size", args.batch_size, "16")) if v != d]
        if given:
            raise ValueError(f"{', '.join(given)} set(s) how zero-shot tasks are scored: add --tasks (e.g. --tasks "
                             f"piqa), or drop {'them' if len(given) > 1 else 'it'} for a perplexity run.")
    if args.seqlen is not None and args.seqlen < 2:
        raise ValueError(f"--seqlen {args.seqlen} leaves nothing to predict: a window needs at least 2 tokens.")
    config = local_config(args.model)
    if config is not None and args.seqlen is not None:
        from hfprune.arch import check_seqlen

        check_seqlen(config, args.seqlen, "The evaluation seqlen (--seqlen)")  # before the weights load
    if args.output:
        from hfprune.io import check_output_file
        from hfprune.models import command_inputs

        check_output_file(args.output, args.overwrite, command_inputs(args.model, args.dataset, task_files))
    model = hfprune.load_model(args.model, dtype=args.dtype)
    tokenizer = hfprune.load_tokenizer(args.model)
    result = hfprune.evaluate(model, tokenizer, args.dataset, seqlen=args.seqlen, max_windows=args.max_windows,
                              split=args.split, text_column=args.text_column, progress=progress, **zeroshot)
    result["model"] = str(args.model)
    if args.output:
        from hfprune.fs import write_json_output  # temp file + rename: never a half-written result

        result = write_json_output(args.output, result, default=str)  # printed as written
    if args.json:
        print(json.dumps(result))
        return 0
    if "perplexity" in result:
        print(f"perplexity {result['perplexity']:.4f} over {result['windows']} windows x {result['seqlen']} tokens "
              f"({result['dataset']}); linear-layer sparsity {result['linear_sparsity']:.4f}")
    if "zeroshot" in result:
        from hfprune.eval.zeroshot import format_results

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
    for module in (bench, flow, push, recover, sweep, zeroshot):  # one file per further subcommand in hfprune/cli/
        module.add_cli(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # clean up temporary folders on `kill` too
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, OSError, RuntimeError, ImportError) as err:
        logger.error("%s", err)
        return 2
    except KeyboardInterrupt as err:
        hint = ""
        if getattr(args, "output", None):
            hint = ": nothing was written to the output (it is replaced only when complete)"
            if hasattr(args, "low_memory"):
                hint += "; a --low-memory run continues from its last finished block with --resume"
        logger.error("%s%s.", "Terminated" if isinstance(err, Terminated) else "Interrupted", hint)
        return 143 if isinstance(err, Terminated) else 130
    except Exception:  # noqa: BLE001 - not an input error: a bug; show where, and ask for a report
        from hfprune.config import __version__

        logger.exception("Internal error in hfprune %s. This is a bug, not a problem with your input: please report "
                         "it to the hfprune maintainers with the command and this traceback.", __version__)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` (temporary folders, locks) runs."""


def _on_sigterm(signum, frame):
    raise Terminated()


