"""Training with sparse weights.

* :mod:`~hfprune.training.masks`: :class:`MaskPreservingCallback` keeps every pruned weight exactly zero
  while a ``Trainer`` fine-tunes a pruned model (full fine-tuning or peft LoRA).
* :mod:`~hfprune.training.lora`: :func:`merge_lora_keep_sparsity` merges LoRA adapters into a pruned base model.
* :mod:`~hfprune.training.distill`: :class:`DistillationTrainer` / :func:`distillation_loss` /
  :func:`hidden_state_loss` from a dense teacher (students may be structurally smaller).
* :mod:`~hfprune.training.gradual`: :func:`cubic_sparsity`, :class:`GradualPruner` and
  :class:`GradualPruningCallback`: train-time gradual pruning (Zhu & Gupta 2017).
"""

import importlib

# Resolved on first use (PEP 562): importing one submodule (e.g. ``hfprune.training.masks`` for the
# recovery CLI's flags) must not import ``Trainer``, ``datasets`` and ``peft`` through the others; every
# ``hfprune`` command builds its whole parser, so eager imports here cost each run ~190 MB of RSS.
_EXPORTS = {
    "DistillationTrainer": "distill", "distillation_loss": "distill", "hidden_state_loss": "distill",
    "GradualPruner": "gradual", "GradualPruningCallback": "gradual", "cubic_sparsity": "gradual",
    "merge_lora_keep_sparsity": "lora",
    "PRUNABLE_TYPES": "masks", "MaskPreservingCallback": "masks", "canonical_name": "masks",
    "masks_from_zeros": "masks", "sparsity_report": "masks",
}

__all__ = ["PRUNABLE_TYPES", "canonical_name", "masks_from_zeros", "sparsity_report", "MaskPreservingCallback",
           "merge_lora_keep_sparsity", "distillation_loss", "hidden_state_loss", "DistillationTrainer",
           "cubic_sparsity", "GradualPruner", "GradualPruningCallback"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
