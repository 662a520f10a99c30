"""KL distillation from a dense teacher (:class:`DistillationTrainer`, :func:`distillation_loss`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer


logger = logging.getLogger(__name__)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged over positions.

    Args:
        student_logits, teacher_logits: ``[..., vocab]`` (same shape).
        temperature: softening temperature ``T`` (> 0); the ``T^2`` factor keeps gradient scale
            comparable across temperatures (Hinton et al. 2015).
        mask: optional boolean ``[...]`` selecting the positions that count (e.g. labels != -100).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"Student and teacher vocabularies differ ({student_logits.shape[-1]} vs "
                         f"{teacher_logits.shape[-1]}); distillation on logits needs the same vocabulary.")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(-1)
    if mask is not None:
        kl = kl[mask.to(kl.device, torch.bool)]
    if kl.numel() == 0:
        return student_logits.sum() * 0.0
    return kl.mean() * temperature ** 2


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


class DistillationTrainer(Trainer):
    """``Trainer`` whose loss is ``alpha * T^2 KL(teacher || student) + (1 - alpha) * task loss``.

    The teacher runs under ``no_grad`` in eval mode on the same inputs (without labels). The KL
    term is averaged over the positions whose label is not ``-100`` (labels shifted by one for
    causal LMs), over all positions of the attention mask when there are no labels, or over the
    batch for sequence-level logits. Both terms are per-micro-batch means, and the Trainer divides
    them by the gradient-accumulation steps (``loss_is_scaled_for_ga = False``).

    Args:
        teacher_model: the dense model (same vocabulary). Moved to ``args.device`` unless it was
            dispatched with a ``device_map``.
        temperature: ``T`` (> 0). alpha: weight of the KL term in ``[0, 1]``; ``alpha < 1``
            needs labels so that the model returns its task loss.
        shift_labels: treat logits as next-token predictions; ``None`` detects causal-LM classes.
    """

    def __init__(self, *args, teacher_model: nn.Module, temperature: float = 2.0, alpha: float = 0.5,
                 shift_labels: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        teacher_model.eval()
        teacher_model.requires_grad_(False)
        if getattr(teacher_model, "hf_device_map", None) is None:
            teacher_model.to(self.args.device)
        self.teacher_model = teacher_model
        self.shift_labels = _is_causal_lm(self.model) if shift_labels is None else shift_labels
        self.loss_is_scaled_for_ga = False

    def _kl_mask(self, logits: torch.Tensor, inputs: Mapping) -> tuple[torch.Tensor | None, bool]:
        """Positions that count for the KL term, and whether logits must drop their last position."""
        if logits.dim() < 3:
            return None, False
        labels = inputs.get("labels")
        if labels is not None and tuple(labels.shape) == tuple(logits.shape[:2]):
            if self.shift_labels:
                return labels[:, 1:] != -100, True
            return labels != -100, False
        attention = inputs.get("attention_mask")
        if attention is not None and tuple(attention.shape) == tuple(logits.shape[:2]):
            return attention.bool(), False
        return None, False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # num_items_in_batch is deliberately not forwarded: both terms are per-batch means.
        outputs = model(**inputs)
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            teacher_logits = self.teacher_model(**teacher_inputs).logits
        student_logits = outputs.logits
        mask, drop_last = self._kl_mask(student_logits, inputs)
        s_logits, t_logits = student_logits, teacher_logits.to(student_logits.device)
        if drop_last:
            s_logits, t_logits = s_logits[:, :-1], t_logits[:, :-1]
        kl = distillation_loss(s_logits, t_logits, self.temperature, mask)
        if self.alpha < 1.0:
            task = outputs.get("loss") if isinstance(outputs, Mapping) else None
            if task is None:
                raise ValueError("DistillationTrainer with alpha < 1 needs the model's task loss: pass "
                                 "labels in the inputs (or use alpha=1 for pure distillation).")
            loss = self.alpha * kl + (1.0 - self.alpha) * task
        else:
            loss = kl
        return (loss, outputs) if return_outputs else loss
