"""Recovery fine-tuning of a pruned model that keeps every pruned weight at exactly zero.

:func:`recover` trains a pruned causal LM on packed token windows of a text source (C4 by
default) with ``transformers.Trainer``, full fine-tuning or peft LoRA, optionally distilling from
the dense model, while :class:`~hfprune.training.MaskPreservingCallback` holds the zeros. It
evaluates perplexity on a *different* text (WikiText-2 by default) every ``eval_steps``, stops
at ``max_steps`` or when the ``max_minutes`` wall-clock budget is spent, checks that no pruned
weight came back, and saves atomically (model + tokenizer + ``recovery_report.json``)::

    from hfprune.workflows.recovery import RecoveryArguments, recover
    result = recover(model, tokenizer, RecoveryArguments(max_steps=200, lora=True, output="out"))

Command line (``hfprune recover``; every :class:`RecoveryArguments` field is a flag, and
``--recipe R.yaml`` holds the same keys)::

    hfprune recover --model pruned/ --dataset c4 --max-steps 200 --seqlen 256 --lora --output out/
"""

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from hfprune.arch import check_seqlen
from hfprune.data import _ALIASES, load_texts
from hfprune.eval.perplexity import eval_token_ids, perplexity
from hfprune.io import check_output_dir, save_pretrained
from hfprune.models import command_inputs
from hfprune.report import zero_counts
from hfprune.training import DistillationTrainer, merge_lora_keep_sparsity
from hfprune.training.masks import MaskPreservingCallback, _prunable_weights, canonical_name, masks_from_zeros
from hfprune.workflows.recovery_args import _NO_EVAL, RecoveryArguments, arguments_from  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

__all__ = ["RecoveryArguments", "arguments_from", "recover", "recovery_record", "token_windows", "TimeBudgetCallback",
           "RecoveryLogCallback", "check_masks"]

# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def token_windows(tokenizer, texts: list[str], seqlen: int, *, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[N, seqlen]`` windows of the documents packed into one stream.

    Each document is tokenised without special tokens and followed by the EOS token (BOS when
    there is no EOS); documents are read in order until ``max_windows`` windows exist (all of
    them when ``None``); the trailing partial window is dropped.
    """
    if not texts:
        raise ValueError("The training data is empty: pass a data set (--dataset) with at least one document.")
    sep = getattr(tokenizer, "eos_token_id", None)
    if sep is None:
        sep = getattr(tokenizer, "bos_token_id", None)
    stream: list[int] = []
    need = None if max_windows is None else max_windows * seqlen
    chunk = 64
    for start in range(0, len(texts), chunk):
        batch = [t for t in texts[start:start + chunk] if t]
        if not batch:
            continue
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            if sep is not None:
                stream.append(sep)
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"The training text has {len(stream)} tokens, fewer than one window of seqlen={seqlen}: "
                         f"lower --seqlen or give more text (--dataset).")
    return torch.tensor(stream[: n * seqlen], dtype=torch.long).view(n, seqlen)


class _WindowDataset(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict:
        row = self.windows[i]
        return {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()}


def _same_source(a, b) -> bool:
    if not isinstance(a, (str, os.PathLike)) or not isinstance(b, (str, os.PathLike)):
        return False

    def norm(x):
        x = os.fspath(x)
        key = _ALIASES.get(x.lower())
        if key is not None:
            return key
        p = Path(x).expanduser()
        return str(p.resolve()) if p.exists() else x

    return norm(a) == norm(b)


# --------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------

class TimeBudgetCallback(TrainerCallback):
    """Stop training (``control.should_training_stop``) after the step during which the wall-clock
    time since ``on_train_begin`` exceeded ``max_minutes``.

    ``excluded_seconds``: optional callable returning seconds not to count (e.g. the time spent in
    periodic evaluations, :attr:`RecoveryLogCallback.eval_seconds`)."""

    def __init__(self, max_minutes: float, excluded_seconds=None):
        if not max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {max_minutes}.")
        self.max_seconds = 60.0 * float(max_minutes)
        self.excluded_seconds = excluded_seconds
        self.start: float | None = None
        self.stopped = False

    def elapsed(self) -> float:
        if self.start is None:
            return 0.0
        spent = time.perf_counter() - self.start
        return spent - (float(self.excluded_seconds()) if self.excluded_seconds is not None else 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None and self.elapsed() >= self.max_seconds:
            if not self.stopped:
                logger.info("Time budget of %.2f min spent after %d steps: stopping training.",
                            self.max_seconds / 60, state.global_step)
            self.stopped = True
            control.should_training_stop = True
        return control


class RecoveryLogCallback(TrainerCallback):
    """Records the training loss curve and evaluates perplexity every ``eval_steps`` steps (also
    before the first step and after the last one), logging both through :mod:`logging`.

    ``losses``: ``[{"step", "loss", "learning_rate", "seconds"}]``; ``evals``: ``[{"step",
    "perplexity", "nll", "windows", "seconds"}]`` (``seconds`` since training began).
    """

    def __init__(self, tokenizer=None, eval_ids: torch.Tensor | None = None, *, eval_steps: int = 0,
                 eval_seqlen: int | None = None, eval_max_windows: int | None = None):
        self.tokenizer = tokenizer
        self.eval_ids = eval_ids
        self.eval_steps = int(eval_steps)
        self.eval_seqlen = eval_seqlen  # None: 2048 or the model's positions (see perplexity)
        self.eval_max_windows = eval_max_windows
        self.losses: list[dict] = []
        self.evals: list[dict] = []
        self.eval_seconds = 0.0  # time spent evaluating (since on_train_begin)
        self.start = time.perf_counter()

    def _elapsed(self) -> float:
        return round(time.perf_counter() - self.start, 3)

    def evaluate(self, model, step: int) -> None:
        if self.eval_ids is None or model is None:
            return
        if self.evals and self.evals[-1]["step"] == step:
            return

        t0 = time.perf_counter()
        res = perplexity(model, self.tokenizer, seqlen=self.eval_seqlen, max_windows=self.eval_max_windows,
                         token_ids=self.eval_ids, progress=False)
        self.evals.append({"step": int(step), "perplexity": res["perplexity"], "nll": res["nll"],
                           "windows": res["windows"], "seconds": self._elapsed()})
        self.eval_seconds += time.perf_counter() - t0
        logger.info("step %d: eval perplexity %.4f (%d windows x %d tokens, %.1fs)", step, res["perplexity"],
                    res["windows"], res["seqlen"], res["seconds"])

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = time.perf_counter()
        self.eval_seconds = 0.0
        self.evaluate(model, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            entry = {"step": int(state.global_step), "loss": float(logs["loss"]),
                     "learning_rate": float(logs["learning_rate"]) if "learning_rate" in logs else None,
                     "seconds": self._elapsed()}
            self.losses.append(entry)
            logger.info("step %d: train loss %.4f (lr %s)", entry["step"], entry["loss"], entry["learning_rate"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.eval_steps > 0 and state.global_step % self.eval_steps == 0:
            self.evaluate(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.evaluate(model, state.global_step)


# --------------------------------------------------------------------------------------------
# Sparsity bookkeeping
# --------------------------------------------------------------------------------------------

def _output_weight_ids(model) -> set[int]:
    try:
        out = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return set()
    return {id(p) for p in out.parameters()} if isinstance(out, torch.nn.Module) else set()


def _is_output_head(model, param_name: str, out_ids: set[int]) -> bool:
    """Whether ``param_name`` (``<module>.weight``, possibly a tied weight that ``named_parameters``
    lists under another name) is the output head's weight."""
    mod_name, _, attr = param_name.rpartition(".")
    try:
        weight = getattr(model.get_submodule(mod_name), attr, None) if mod_name else getattr(model, attr, None)
    except AttributeError:
        return False
    return id(weight) in out_ids


def _is_structured(model) -> bool:
    """Whether the model's pruning record says heads / neurons / blocks were removed (structured
    pruning), so there is no zero pattern to preserve."""
    pc = getattr(getattr(model, "config", None), "pruning_config", None)
    if not isinstance(pc, dict):
        return False
    # structured records carry the parameter counts before/after (PruneReport.pruning_config)
    return "params_after" in pc or str(pc.get("method", "")).startswith("structured")


def _sparsity(model) -> dict:
    """Exact zeros of the prunable weights, the output head excluded (it is never pruned; tied to the
    embeddings it may hold zeros of its own, e.g. from a quantized source)."""
    out_ids = _output_weight_ids(model)
    return zero_counts((canonical_name(n), w) for n, _, w in _prunable_weights(model)
                       if not _is_output_head(model, n, out_ids))


def check_masks(model, masks: dict[str, torch.Tensor]) -> dict:
    """Verify every pruned position of ``masks`` is still exactly zero in ``model`` (names are
    matched through peft / DDP wrappers). Raises ``RuntimeError`` naming the layers that lost
    zeros. Returns ``{"layers_checked", "new_zeros"}`` (kept weights that became exactly zero)."""
    table = {}
    for name, param in model.named_parameters():
        table.setdefault(canonical_name(name), param)
    bad, missing, new_zeros = [], [], 0
    with torch.no_grad():
        for name, mask in masks.items():
            param = table.get(canonical_name(name))
            if param is None:
                missing.append(name)
                continue
            mask = mask.to(param.device)
            if torch.count_nonzero(param[mask]) > 0:
                bad.append(name)
            new_zeros += int((param[~mask] == 0).sum().item())
    if missing:
        raise RuntimeError(f"{len(missing)} pruned weight(s) are missing from the trained model, e.g. {missing[:3]}.")
    if bad:
        raise RuntimeError(f"Recovery fine-tuning filled pruned weights in {len(bad)} layer(s), e.g. {bad[:3]}: "
                           f"the sparsity was not preserved (report this as a bug in hfprune).")
    return {"layers_checked": len(masks), "new_zeros": new_zeros}


# --------------------------------------------------------------------------------------------
# recover()
# --------------------------------------------------------------------------------------------

def _load_train_texts(args: RecoveryArguments) -> list[str]:
    if args.eval_enabled and _same_source(args.dataset, args.eval_dataset):
        raise ValueError(f"The training data set ({args.dataset}) is the evaluation text ({args.eval_dataset}): "
                         f"train on other text (--dataset c4) or evaluate elsewhere (--eval-dataset).")
    return load_texts(args.dataset, split=args.split, text_column=args.text_column, purpose="training")


def _lora_targets(value: str):
    value = str(value).strip()
    if value == "all-linear":
        return value
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ValueError("lora_target_modules is empty: pass all-linear or names such as q_proj,v_proj.")
    return names


def _wrap_lora(model, args: RecoveryArguments):
    try:
        import peft
    except ImportError as err:
        raise ImportError("LoRA recovery needs peft: `pip install peft` (or drop --lora).") from err
    config = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                             target_modules=_lora_targets(args.lora_target_modules), task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)
    return peft.get_peft_model(model, config)


def _training_arguments(args: RecoveryArguments, output_dir: str):
    from transformers import TrainingArguments

    use_cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=output_dir, max_steps=args.max_steps, learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, lr_scheduler_type=args.lr_scheduler_type, bf16=args.bf16,
        seed=args.seed, data_seed=args.seed, use_cpu=use_cpu, report_to=[], save_strategy="no",
        eval_strategy="no", logging_strategy="steps", logging_steps=args.logging_steps, logging_first_step=True,
        disable_tqdm=not sys.stderr.isatty(), dataloader_num_workers=0, dataloader_pin_memory=not use_cpu,
        label_names=["labels"], optim="adamw_torch",
    )


def recover(model, tokenizer, args: RecoveryArguments | None = None, *, teacher=None,
            train_texts: list[str] | None = None) -> dict:
    """Fine-tune a pruned causal LM to recover quality, keeping every pruned weight at exactly 0.

    Args:
        model: the pruned model; trained in place (with ``lora`` the adapters are injected into
            it and, with ``merge_lora``, merged back keeping the zeros).
        tokenizer: its tokenizer (tokenises the training windows and the evaluation text).
        args: :class:`RecoveryArguments` (defaults when ``None``).
        teacher: the dense model to distil from; required when ``args.distill``.
        train_texts: documents to train on instead of ``args.dataset`` (e.g. C4 minus the
            documents used for calibration).

    Returns:
        ``{"losses": [{"step", "loss", ...}], "evals": [{"step", "perplexity", ...}],
        "sparsity_before", "sparsity_after", "steps", "seconds", "stopped_by_time",
        "train_windows", "train_tokens", "zeros_before", "zeros_after", "output", "lora",
        "merged"}``; also written to ``<output>/recovery_report.json`` when ``args.output``.

    Raises:
        RuntimeError: if any pruned weight is non-zero after training (sparsity not kept).
    """
    from transformers import PrinterCallback, Trainer

    args = args if args is not None else RecoveryArguments()
    inputs = command_inputs(args.model, args.teacher, args.dataset, args.eval_dataset)
    if args.output is not None:
        check_output_dir(args.output, args.overwrite, inputs)  # fail before the slow part
    check_seqlen(model.config, args.seqlen, "The training seqlen (--seqlen)")  # not one endless step later
    if args.eval_enabled and args.eval_seqlen is not None:
        check_seqlen(model.config, args.eval_seqlen, "The evaluation seqlen (--eval-seqlen)")
    if args.distill and teacher is None:
        raise ValueError("distill=True needs the dense teacher: pass recover(..., teacher=dense_model) "
                         "(CLI: --teacher DIR).")
    if teacher is not None and not args.distill:
        logger.info("A teacher was given but distill=False: training without distillation.")
    if args.distill and args.hidden_weight > 0:
        hs, ht = (getattr(m.config.get_text_config(), "hidden_size", None) for m in (model, teacher))
        if hs != ht:
            raise ValueError(f"hidden_weight > 0 needs the same hidden size in student and teacher (student {hs}, "
                             f"teacher {ht}, e.g. after hidden-size pruning): use hidden_weight=0 (logits only).")

    before = _sparsity(model)
    out_ids = _output_weight_ids(model)
    structured = _is_structured(model)
    masks = {} if structured else {canonical_name(n): m.cpu() for n, m in masks_from_zeros(model).items()
                                   if not _is_output_head(model, n, out_ids)}
    if structured:
        logger.info("Structured (physically smaller) model: no pruned zeros to hold; every weight trains.")
    elif not masks:
        logger.warning("The model has no exactly-zero weights: recovery will train it like a dense model.")
    logger.info("Recovery: sparsity %.4f over %d layers; %s, %d steps max%s.", before["sparsity"],
                len(before["layers"]),
                "LoRA" if args.lora else "full fine-tuning", args.max_steps,
                f", {args.max_minutes:g} min budget" if args.max_minutes else "")

    # ---- data -------------------------------------------------------------------------------
    texts = list(train_texts) if train_texts is not None else _load_train_texts(args)
    needed = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    windows = token_windows(tokenizer, texts, args.seqlen, max_windows=needed)
    if windows.shape[0] < needed:
        logger.info("%d training windows; max_steps=%d would use %d, so the data repeats if training runs that long.",
                    windows.shape[0], args.max_steps, needed)
    eval_ids = None
    if args.eval_enabled:
        eval_ids = eval_token_ids(tokenizer, args.eval_dataset)

    # ---- model ------------------------------------------------------------------------------
    train_model = _wrap_lora(model, args) if args.lora else model
    log_cb = RecoveryLogCallback(tokenizer, eval_ids, eval_steps=args.eval_steps, eval_seqlen=args.eval_seqlen,
                                 eval_max_windows=args.eval_max_windows)
    callbacks = [MaskPreservingCallback(masks=masks), log_cb]
    budget = TimeBudgetCallback(args.max_minutes, lambda: log_cb.eval_seconds) if args.max_minutes else None
    if budget is not None:
        callbacks.insert(0, budget)  # its clock starts before the step-0 evaluation, which it then excludes

    use_cache = getattr(model.config, "use_cache", None)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hfprune-recover-") as scratch:
        targs = _training_arguments(args, scratch)
        kwargs = dict(model=train_model, args=targs, train_dataset=_WindowDataset(windows), callbacks=callbacks)
        if args.distill:
            trainer = DistillationTrainer(**kwargs, teacher_model=teacher, temperature=args.temperature,
                                          alpha=args.alpha, hidden_weight=args.hidden_weight)
        else:
            trainer = Trainer(**kwargs)
        trainer.remove_callback(PrinterCallback)  # it print()s every log; RecoveryLogCallback logs instead
        if use_cache is not None:
            model.config.use_cache = False
        try:
            trainer.train()
        finally:
            if use_cache is not None:
                model.config.use_cache = use_cache
    seconds = time.perf_counter() - start
    steps = int(trainer.state.global_step)

    # ---- merge, check -----------------------------------------------------------------------
    final = train_model
    merged = False
    if args.lora and args.merge_lora:
        final = merge_lora_keep_sparsity(train_model, masks)
        merged = True
    final.eval()
    checked = check_masks(final, masks)
    after = _sparsity(final)
    if after["zeros"] != before["zeros"]:
        logger.warning("%d kept weight(s) became exactly zero during training (all pruned weights are still zero): "
                       "sparsity %.6f -> %.6f.", after["zeros"] - before["zeros"], before["sparsity"],
                       after["sparsity"])

    result = {
        "losses": log_cb.losses,
        "evals": log_cb.evals,
        "sparsity_before": before["sparsity"],
        "sparsity_after": after["sparsity"],
        "zeros_before": before["zeros"],
        "zeros_after": after["zeros"],
        "layers_checked": checked["layers_checked"],
        "steps": steps,
        "seconds": seconds,
        "eval_seconds": log_cb.eval_seconds,
        "stopped_by_time": bool(budget is not None and budget.stopped),
        "train_windows": int(windows.shape[0]),
        "train_tokens": int(windows.numel()),
        "tokens_seen": steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.seqlen,
        "lora": bool(args.lora),
        "merged": merged,
        "output": args.output,
    }
    logger.info("Recovery done: %d steps in %.1fs; sparsity %.4f -> %.4f.", steps, seconds, before["sparsity"],
                after["sparsity"])

    # ---- save -------------------------------------------------------------------------------
    if args.output is not None:
        report = {**result, "args": args.to_dict()}
        if not (args.lora and not args.merge_lora):
            final.config.recovery_config = recovery_record(args, result)
        save_pretrained(final, args.output, tokenizer=tokenizer, overwrite=args.overwrite, model_card=False,
                        extra_files={"recovery_report.json": report}, inputs=inputs)
        logger.info("Saved the recovered %s to %s.", "adapter" if args.lora and not args.merge_lora else "model",
                    args.output)
    return result


def recovery_record(args: RecoveryArguments, result: dict) -> dict:
    """The ``config.recovery_config`` entry of a recovered checkpoint (what :func:`recover` returned)."""
    return {"method": "lora" if args.lora else "full", "steps": result["steps"], "dataset": str(args.dataset),
            "seqlen": args.seqlen, "learning_rate": args.learning_rate, "distill": bool(args.distill),
            "hidden_weight": args.hidden_weight, "sparsity": result["sparsity_after"]}
