"""Distillation from a dense teacher: KL on logits (:func:`distillation_loss`), optionally hidden
states (:func:`hidden_state_loss`), in a ``Trainer`` (:class:`DistillationTrainer`). Students may be
smaller than the teacher (structured pruning: fewer heads / neurons, or fewer blocks)."""

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


def hidden_state_loss(student_hidden, teacher_hidden, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the student's blocks of ``||h_s - h_t||^2 / ||h_t||^2`` (normalised MSE).

    ``student_hidden`` / ``teacher_hidden`` are the ``output_hidden_states`` tuples (embeddings
    first, ``L + 1`` entries, each ``[batch, seq, hidden]``). Student block ``i`` of ``L_s`` is
    matched with teacher block ``round(i * L_t / L_s)``: the same block when the depths agree, the
    block at the same relative depth when blocks were removed. The embedding outputs are skipped.
    ``mask`` (``[batch, seq]`` bool) selects the positions that count.
    """
    ls, lt = len(student_hidden) - 1, len(teacher_hidden) - 1
    if ls < 1 or lt < 1:
        raise ValueError("hidden_state_loss needs the hidden states of at least one block of each model.")
    if student_hidden[-1].shape[-1] != teacher_hidden[-1].shape[-1]:
        raise ValueError(f"Hidden-state distillation needs the same hidden size (student "
                         f"{student_hidden[-1].shape[-1]}, teacher {teacher_hidden[-1].shape[-1]}): distil the "
                         f"logits only (hidden_weight=0).")
    total = 0.0
    for i in range(1, ls + 1):
        s = student_hidden[i].float()
        t = teacher_hidden[round(i * lt / ls)].float().to(s.device)
        if mask is not None:
            keep = mask.to(s.device, torch.bool)
            s, t = s[keep], t[keep]
        total = total + ((s - t) ** 2).sum(-1).mean() / (t ** 2).sum(-1).mean().clamp_min(1e-12)
    return total / ls


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
        hidden_weight: weight of :func:`hidden_state_loss` added to the loss (0: logits only);
            needs equal hidden sizes (width-pruned or depth-pruned students, not hidden-size pruned).
    """

    def __init__(self, *args, teacher_model: nn.Module, temperature: float = 2.0, alpha: float = 0.5,
                 shift_labels: bool | None = None, hidden_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        if not hidden_weight >= 0:
            raise ValueError(f"hidden_weight must be >= 0, got {hidden_weight}.")
        self.hidden_weight = float(hidden_weight)
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
        hidden = {"output_hidden_states": True} if self.hidden_weight > 0 else {}
        outputs = model(**inputs, **hidden)
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            teacher_out = self.teacher_model(**teacher_inputs, **hidden)
        teacher_logits = teacher_out.logits
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
        if self.hidden_weight > 0:
            attention = inputs.get("attention_mask")
            loss = loss + self.hidden_weight * hidden_state_loss(outputs.hidden_states, teacher_out.hidden_states,
                                                                 attention.bool() if attention is not None else None)
        return (loss, outputs) if return_outputs else loss
