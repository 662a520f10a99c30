"""The settings of recovery fine-tuning (:class:`RecoveryArguments`), apart from the training code.

Kept in their own module so that building the ``hfprune`` command line (``hfprune recover``'s flags
come from these fields) imports neither ``transformers.Trainer`` nor peft: :mod:`hfprune.workflows.recovery`
re-exports both names.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["RecoveryArguments", "arguments_from"]

_NO_EVAL = ("", "none", "null", "off")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class RecoveryArguments:
    """Settings of :func:`recover` and of ``hfprune recover`` (``HfArgumentParser``-ready: every
    field has a ``help`` in its metadata; ``--recipe`` YAML files use the same keys)."""

    model: Optional[str] = field(default=None, metadata=_help(
        "Pruned model: local checkpoint folder, Hub id or alias (CLI only; recover() takes the model)."))
    dataset: str = field(default="c4", metadata=_help(
        "Training text: c4, a local txt/json/jsonl/parquet/csv file, or a Hub data set name. Never the eval text."))
    split: str = field(default="train", metadata=_help("Split of the training data set."))
    text_column: str = field(default="text", metadata=_help("Text column of the training data set."))
    seqlen: int = field(default=256, metadata=_help("Tokens per training window (documents are packed)."))
    max_steps: int = field(default=200, metadata=_help("Optimizer steps (the data repeats if it runs out)."))
    learning_rate: float = field(default=1e-4, metadata=_help(
        "Peak learning rate (about 1e-4 for full fine-tuning, 1e-3 for LoRA)."))
    per_device_train_batch_size: int = field(default=8, metadata=_help("Windows per micro-batch."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW decoupled weight decay."))
    warmup_steps: float = field(default=0.05, metadata=_help(
        "Warmup steps; a value below 1 is a fraction of max_steps."))
    lr_scheduler_type: str = field(default="cosine", metadata=_help(
        "transformers scheduler name (cosine, linear, constant_with_warmup, ...). The schedule spans max_steps, "
        "so with --max-minutes prefer constant_with_warmup or a max_steps that fits the budget."))
    lora: bool = field(default=False, metadata=_help("Train peft LoRA adapters instead of all weights."))
    lora_r: int = field(default=16, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA scaling alpha."))
    lora_dropout: float = field(default=0.05, metadata=_help("LoRA dropout."))
    lora_target_modules: str = field(default="all-linear", metadata=_help(
        "Comma-separated module names for LoRA, or all-linear (every linear layer but the output head)."))
    merge_lora: bool = field(default=True, metadata=_help(
        "Merge the adapters keeping the pruned zeros (a dense-format sparse checkpoint); with --no-merge-lora "
        "the adapter is saved unmerged with peft's save_pretrained."))
    distill: bool = field(default=False, metadata=_help("Distil from the dense teacher (KL on logits)."))
    teacher: Optional[str] = field(default=None, metadata=_help(
        "Dense teacher model for --distill (CLI; default: base_model recorded in the pruned model's config)."))
    temperature: float = field(default=2.0, metadata=_help("Distillation temperature."))
    alpha: float = field(default=0.5, metadata=_help(
        "Weight of the distillation KL term in [0, 1]; 1 - alpha weighs the language-model loss."))
    hidden_weight: float = field(default=0.0, metadata=_help(
        "With --distill: weight of a hidden-state term (normalised MSE between student and teacher hidden states, "
        "blocks matched by relative depth) added to the loss; needs equal hidden sizes. 0: logits only."))
    eval_dataset: str = field(default="wikitext2", metadata=_help(
        "Perplexity text evaluated during training (none disables evaluation)."))
    eval_seqlen: Optional[int] = field(default=None, metadata=_help(
        "Evaluation window length (default 2048, the papers' protocol, or the model's positions when fewer)."))
    eval_max_windows: Optional[int] = field(default=8, metadata=_help(
        "Evaluation windows per evaluation (None: the whole text)."))
    eval_steps: int = field(default=0, metadata=_help(
        "Evaluate every N optimizer steps (0: only before and after training)."))
    logging_steps: int = field(default=10, metadata=_help("Record the training loss every N steps."))
    max_minutes: Optional[float] = field(default=None, metadata=_help(
        "Wall-clock budget of the training loop in minutes (time spent in periodic evaluations not counted); "
        "training stops after the step that exceeds it."))
    seed: int = field(default=0, metadata=_help("Seed of data order, LoRA init and dropout."))
    bf16: bool = field(default=False, metadata=_help("bf16 mixed precision."))
    output: Optional[str] = field(default=None, metadata=_help(
        "Output folder (model + tokenizer + recovery_report.json); must be empty unless --overwrite. "
        "Command line only: a recipe may not set it."))
    overwrite: bool = field(default=False, metadata=_help(
        "Replace an earlier hfprune output in --output (a folder holding other files is refused). Command line "
        "only: a recipe may not set it."))
    dtype: str = field(default="auto", metadata=_help(
        "dtype to load the model with (CLI): auto (the checkpoint's), float32, bfloat16 or float16."))

    def __post_init__(self):
        positive = {"seqlen": self.seqlen, "max_steps": self.max_steps,
                    "per_device_train_batch_size": self.per_device_train_batch_size,
                    "gradient_accumulation_steps": self.gradient_accumulation_steps, "lora_r": self.lora_r,
                    "eval_seqlen": self.eval_seqlen, "logging_steps": self.logging_steps}
        for name, value in positive.items():
            if value is None and name == "eval_seqlen":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}: change --{name.replace('_', '-')}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}: change --learning-rate.")
        if self.eval_steps < 0:
            raise ValueError(f"eval_steps must be >= 0, got {self.eval_steps}: change --eval-steps.")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}: change --weight-decay.")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}: change --lora-alpha.")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}: change --warmup-steps.")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}: change --max-minutes (or omit it).")
        if self.eval_max_windows is not None and self.eval_max_windows < 0:
            raise ValueError(f"eval_max_windows must be >= 0, got {self.eval_max_windows}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}: change --alpha.")
        if not self.hidden_weight >= 0:
            raise ValueError(f"hidden_weight must be >= 0, got {self.hidden_weight}: change --hidden-weight.")
        if self.hidden_weight > 0 and not self.distill:
            raise ValueError("hidden_weight > 0 distils hidden states from the teacher: add --distill (and --teacher).")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}: change --temperature.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}: change --lora-dropout.")

    @property
    def eval_enabled(self) -> bool:
        return (self.eval_dataset is not None and str(self.eval_dataset).strip().lower() not in _NO_EVAL
                and self.eval_max_windows != 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_COMMAND_LINE_ONLY = ("output", "overwrite")


def arguments_from(recipe: dict | None = None, overrides: dict | None = None) -> RecoveryArguments:
    """:class:`RecoveryArguments` from recipe data plus overrides (dashes in keys allowed);
    unknown keys, and ``output`` / ``overwrite`` in the recipe (command line only), raise ``ValueError``."""
    names = {f.name for f in dataclasses.fields(RecoveryArguments)}
    data: dict = {}
    for source, label in ((recipe or {}, "recipe"), (overrides or {}, "flags")):
        for key, value in source.items():
            k = str(key).replace("-", "_")
            if label == "recipe" and k == "description":
                continue
            if label == "recipe" and k in _COMMAND_LINE_ONLY:
                raise ValueError(f"The recipe sets `{key}`: where to write and whether to replace it come from the "
                                 f"command line only (--output OUT, --overwrite), so that running a shared recipe "
                                 f"never writes or deletes a folder you did not name. Remove `{key}` from the recipe.")
            if k not in names:
                raise ValueError(f"Unknown {label} key {key!r}: valid keys are {', '.join(sorted(names))}.")
            data[k] = value
    return RecoveryArguments(**data)
