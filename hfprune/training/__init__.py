"""Training with sparse weights.

* :mod:`~hfprune.training.masks`: :class:`MaskPreservingCallback` keeps every pruned weight exactly zero
  while a ``Trainer`` fine-tunes a pruned model (full fine-tuning or peft LoRA).
* :mod:`~hfprune.training.lora`: :func:`merge_lora_keep_sparsity` merges LoRA adapters into a pruned base model.
* :mod:`~hfprune.training.distill`: :class:`DistillationTrainer` / :func:`distillation_loss` /
  :func:`hidden_state_loss` from a dense teacher (students may be structurally smaller).
* :mod:`~hfprune.training.gradual`: :func:`cubic_sparsity`, :class:`GradualPruner` and
  :class:`GradualPruningCallback`: train-time gradual pruning (Zhu & Gupta 2017).
"""

from hfprune.training.distill import DistillationTrainer, distillation_loss, hidden_state_loss
from hfprune.training.gradual import GradualPruner, GradualPruningCallback, cubic_sparsity
from hfprune.training.lora import merge_lora_keep_sparsity
from hfprune.training.masks import PRUNABLE_TYPES, MaskPreservingCallback, canonical_name, masks_from_zeros, sparsity_report

__all__ = ["PRUNABLE_TYPES", "canonical_name", "masks_from_zeros", "sparsity_report", "MaskPreservingCallback",
           "merge_lora_keep_sparsity", "distillation_loss", "hidden_state_loss", "DistillationTrainer",
           "cubic_sparsity", "GradualPruner", "GradualPruningCallback"]
