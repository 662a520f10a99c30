"""One flow: prune -> recover -> save -> push, from one YAML recipe (``hfprune flow``).

A flow recipe has one section per step; each section holds the keys of the config it becomes::

    description: ...
    prune:                  # a pruning recipe (recipes/*.yaml): method, target/heads_ratio/..., calibration
      method: wanda
      target: heads,mlp
      heads_ratio: 0.33333333
      calibration: {dataset: c4, nsamples: 64, seqlen: 512, seed: 0}
    recover:                # RecoveryArguments keys (hfprune recover); omit the section to skip the step
      distill: true         # the dense model loaded for the prune step is the teacher
      max_minutes: 30
    save:                   # hfprune.save_pretrained options
      format: dense         # dense | sparse | compressed-tensors; bits, group_size
    push:                   # omit (or no repo) to skip
      repo: user/name
      private: false

Every section is parsed, the output folder checked (:mod:`hfprune.fs`: never the model, the recipe
or its data files) and the push repo id validated before the model is loaded, so a typo fails at
once with the key it names. The checkpoint is written once, atomically, by the save step
(the recover step trains in memory); the push step uploads that folder.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from hfprune.core.engine import prune
from hfprune.hub import check_repo_id, push_to_hub
from hfprune.io import check_output_dir, check_save_args, save_pretrained
from hfprune.models import command_inputs, load_model, load_tokenizer
from hfprune.recipes import build_configs
from hfprune.workflows.recovery import arguments_from, recover as run_recovery, recovery_record

logger = logging.getLogger(__name__)

__all__ = ["run_flow", "parse_flow"]

_SECTIONS = ("prune", "recover", "save", "push")
_SAVE_KEYS = ("format", "bits", "group_size", "max_shard_size")
_PUSH_KEYS = ("repo", "private", "exist_ok", "commit_message")


def parse_flow(data: dict[str, Any]) -> dict[str, Any]:
    """Check a flow recipe and build its configs: ``{"prune": (config, calibration), "recover":
    RecoveryArguments | None, "save": {...}, "push": {...} | None}``. Raises ``ValueError`` naming
    the section and key to fix."""
    unknown = sorted(set(data) - {*_SECTIONS, "description"})
    if unknown:
        raise ValueError(f"Unknown flow recipe section(s) {unknown}: use {', '.join(_SECTIONS)} (and description).")
    if not isinstance(data.get("prune"), dict):
        raise ValueError("A flow recipe needs a `prune:` section (the keys of a pruning recipe, e.g. method: wanda).")
    parsed: dict[str, Any] = {"prune": build_configs(data["prune"])}
    recover = data.get("recover")
    parsed["recover"] = None
    if recover is not None:
        if not isinstance(recover, dict):
            raise ValueError("`recover:` must be a mapping of RecoveryArguments keys (e.g. distill: true).")
        for key in ("model", "output", "teacher", "overwrite"):
            if key in recover:
                raise ValueError(f"`recover.{key}` is set by the flow itself (the pruned model in memory, the dense "
                                 f"model as teacher, --output / --overwrite); remove it from the recipe.")
        parsed["recover"] = arguments_from(recover)
    for name, keys in (("save", _SAVE_KEYS), ("push", _PUSH_KEYS)):
        section = data.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"`{name}:` must be a mapping with keys among {', '.join(keys)}.")
        bad = sorted(set(section) - set(keys))
        if bad:
            raise ValueError(f"Unknown `{name}` key(s) {bad}: allowed {', '.join(keys)}.")
        parsed[name] = dict(section)
    parsed["save"].setdefault("format", "dense")
    if not parsed["push"].get("repo"):
        parsed["push"] = None
    return parsed


def run_flow(model_name: str, data: dict[str, Any], output, *, repo: str | None = None, overwrite: bool = False,
             progress: bool = True, inputs=()) -> dict[str, Any]:
    """Run a flow recipe (``data``, see the module docstring) on ``model_name`` into ``output``.

    ``repo`` overrides ``push.repo``. ``inputs``: further paths the output must never replace (the
    recipe file; the model and the recipe's data files are added here). Returns ``{"prune":
    PruneReport, "recover": result dict or None, "output": Path, "url": str or None}``.
    """
    if repo:
        data = {**data, "push": {**(data.get("push") or {}), "repo": repo}}
    flow = parse_flow(data)
    config, calibration = flow["prune"]
    args = flow["recover"]
    inputs = command_inputs(model_name, *inputs, getattr(calibration, "dataset", None),
                            *((args.dataset, args.eval_dataset) if args is not None else ()))
    out = check_output_dir(output, overwrite, inputs)   # before anything slow
    if flow["push"] is not None:
        check_repo_id(flow["push"]["repo"])             # a bad repo id fails now, not after the work
    save = flow["save"]
    check_save_args(save["format"], save.get("bits"), save.get("group_size"))

    model = load_model(model_name)
    tokenizer = load_tokenizer(model_name)
    teacher = copy.deepcopy(model).eval() if args is not None and args.distill else None

    logger.info("flow 1/4: prune (%s)", config.method if hasattr(config, "method") else type(config).__name__)
    report = prune(model, tokenizer, config, calibration, progress=progress)
    report.base_model = report.base_model or str(model_name)
    result = None
    if args is not None:
        logger.info("flow 2/4: recover (%s%s)", "distillation" if args.distill else "fine-tuning",
                    f", {args.max_minutes:g} min" if args.max_minutes else "")
        result = run_recovery(model, tokenizer, args, teacher=teacher)
        del teacher
        model.config.recovery_config = recovery_record(args, result)
    logger.info("flow 3/4: save (%s) to %s", save["format"], out)
    extra = {"recovery_report.json": {**result, "args": args.to_dict()}} if result is not None else None
    save_pretrained(model, out, format=save["format"], bits=save.get("bits"), group_size=save.get("group_size"),
                    max_shard_size=save.get("max_shard_size", "5GB"), tokenizer=tokenizer, report=report,
                    overwrite=overwrite, extra_files=extra, inputs=inputs)
    url = None
    if flow["push"] is not None:
        push = flow["push"]
        logger.info("flow 4/4: push to %s", push["repo"])
        url = push_to_hub(out, push["repo"], private=bool(push.get("private", False)),
                          exist_ok=bool(push.get("exist_ok", False)), commit_message=push.get("commit_message"))
    return {"prune": report, "recover": result, "output": Path(out), "url": url}
