"""Training with sparse weights.

* :class:`MaskPreservingCallback` keeps every pruned weight exactly zero while a ``Trainer``
  fine-tunes a pruned model (full fine-tuning or peft LoRA).
* :func:`merge_lora_keep_sparsity` merges LoRA adapters into a pruned base model without filling
  the pruned positions back in; :func:`sparsity_report` counts the zeros.
* :class:`DistillationTrainer` / :func:`distillation_loss`: KL distillation from a dense teacher.
* :func:`cubic_sparsity`, :class:`GradualPruner` (plain torch) and
  :class:`GradualPruningCallback` (``Trainer``): train-time gradual pruning (Zhu & Gupta 2017).

Masks follow :mod:`hfprune.masks`: boolean tensors, ``True`` where a weight is pruned, counts exact.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.pytorch_utils import Conv1D

from .masks import global_budgets, layer_mask, nm_mask, parse_pattern, row_mask

__all__ = [
    "PRUNABLE_TYPES",
    "canonical_name",
    "masks_from_zeros",
    "sparsity_report",
    "MaskPreservingCallback",
    "merge_lora_keep_sparsity",
    "distillation_loss",
    "DistillationTrainer",
    "cubic_sparsity",
    "GradualPruner",
    "GradualPruningCallback",
]

logger = logging.getLogger(__name__)

#: Module types whose ``weight`` can carry a pruning mask.
PRUNABLE_TYPES = (nn.Linear, nn.Conv2d, Conv1D)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
_WRAPPER_SEGMENTS = re.compile(r"\.(?:base_layer|original_module|modules_to_save\.[^.]+)(?=\.|$)")


# --------------------------------------------------------------------------------------------
# Names, adapters and mask bookkeeping
# --------------------------------------------------------------------------------------------

def canonical_name(name: str) -> str:
    """Parameter name with wrapper levels removed, so that masks taken from a plain model apply
    to the same model under peft (``base_model.model.``, ``.base_layer``, ``modules_to_save``),
    DDP (``module.``) or ``torch.compile`` (``_orig_mod.``), and the other way round."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    return _WRAPPER_SEGMENTS.sub("", name)


def _adapter_param_ids(model: nn.Module) -> set[int]:
    """ids of peft adapter parameters (``lora_A``, ``lora_B``, DoRA magnitudes, ...): these are
    never masked (``lora_B`` starts all-zero and must be free to train)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft not installed: nothing is an adapter
        return set()
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            base_ids = {id(p) for p in module.get_base_layer().parameters()}
            ids.update(id(p) for p in module.parameters() if id(p) not in base_ids)
    return ids


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return any(re.search(p, name) for p in patterns or ())


def _prunable_weights(model: nn.Module, include: Iterable[str] | None = None):
    """Yield ``(param_name, module, weight)`` for Linear / Conv1D / Conv2d weights that are not
    peft adapter weights; ``include`` is a list of regexes searched in the parameter name."""
    include = list(include) if include is not None else None
    adapter_ids = _adapter_param_ids(model)
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) in adapter_ids or id(weight) in seen:
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        if include is not None and not _matches(name, include):
            continue
        seen.add(id(weight))
        yield name, module, weight


def masks_from_zeros(model: nn.Module, include: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Pruned-masks (``weight == 0``) of every Linear / ``transformers`` Conv1D / Conv2d weight
    that has at least one exact zero.

    Args:
        model: any ``nn.Module`` (a peft model works: adapter weights are skipped and the base
            weights appear under their peft names, ``...base_layer.weight``).
        include: optional list of regexes; a weight is considered only when one of them is found
            (``re.search``) in its parameter name.

    Returns:
        ``{parameter name: bool tensor}`` on the weight's device, ``True`` where the weight is zero.
    """
    masks = {}
    with torch.no_grad():
        for name, _, weight in _prunable_weights(model, include):
            mask = weight == 0
            if bool(mask.any()):
                masks[name] = mask
    return masks


def sparsity_report(model: nn.Module, include: Iterable[str] | None = None) -> dict:
    """Exact-zero counts of the prunable weights (Linear / Conv1D / Conv2d, adapters excluded).

    Returns:
        ``{"layers": {name: {"zeros", "numel", "sparsity"}}, "zeros": int, "numel": int,
        "sparsity": float}`` where the totals cover all listed layers.
    """
    layers = {}
    zeros_total = numel_total = 0
    with torch.no_grad():
        for name, _, weight in _prunable_weights(model, include):
            zeros = int((weight == 0).sum().item())
            numel = weight.numel()
            layers[name] = {"zeros": zeros, "numel": numel, "sparsity": zeros / max(1, numel)}
            zeros_total += zeros
            numel_total += numel
    report = {"layers": layers, "zeros": zeros_total, "numel": numel_total,
              "sparsity": zeros_total / max(1, numel_total)}
    logger.info("sparsity: %.4f (%d / %d weights zero in %d layers)", report["sparsity"], zeros_total,
                numel_total, len(layers))
    return report


def _base_optimizer(optimizer):
    """Unwrap accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


@dataclass
class _Entry:
    param: torch.Tensor
    mask: torch.Tensor

    def device_mask(self, device: torch.device) -> torch.Tensor:
        if self.mask.device != device:
            self.mask = self.mask.to(device)  # follows the model to its device once
        return self.mask


class _MaskSet:
    """Parameter -> pruned-mask table: zero weights, zero gradients, clear optimizer state."""

    def __init__(self):
        self.entries: dict[str, _Entry] = {}
        self._hooks = []

    def set(self, key: str, param: torch.Tensor, mask: torch.Tensor) -> None:
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(f"Mask for {key!r} has shape {tuple(mask.shape)} but the parameter has "
                             f"shape {tuple(param.shape)}.")
        self.entries[key] = _Entry(param, mask.to(device=param.device, dtype=torch.bool))

    @torch.no_grad()
    def apply(self) -> None:
        for e in self.entries.values():
            e.param.masked_fill_(e.device_mask(e.param.device), 0)

    @torch.no_grad()
    def mask_grads(self) -> None:
        for e in self.entries.values():
            if e.param.grad is not None:
                e.param.grad.masked_fill_(e.device_mask(e.param.grad.device), 0)

    @torch.no_grad()
    def clear_optimizer_state(self, optimizer, keys: Iterable[str] | None = None) -> None:
        """Zero every per-element optimizer state (Adam moments, momentum) at pruned positions, so
        that stale momentum does not push a pruned weight away from zero between re-maskings."""
        if optimizer is None:
            return
        state = getattr(_base_optimizer(optimizer), "state", None)
        if not state:
            return
        for key in keys if keys is not None else self.entries:
            e = self.entries[key]
            for value in state.get(e.param, {}).values():
                if torch.is_tensor(value) and value.shape == e.param.shape:
                    value.masked_fill_(e.device_mask(value.device), 0)

    def install_hooks(self, on_grad=None) -> None:
        """Mask gradients as they are produced (before clipping and accumulation). ``on_grad(key,
        param, grad)`` sees the unmasked gradient first (used for movement / Taylor scores)."""
        self.remove_hooks()
        for key, e in self.entries.items():
            if e.param.requires_grad:
                self._hooks.append(e.param.register_hook(self._make_hook(key, e, on_grad)))

    def add_hook(self, key: str, on_grad=None) -> None:
        e = self.entries[key]
        if e.param.requires_grad:
            self._hooks.append(e.param.register_hook(self._make_hook(key, e, on_grad)))

    @staticmethod
    def _make_hook(key, entry, on_grad):
        def hook(grad):
            if on_grad is not None:
                on_grad(key, entry.param, grad)
            return grad.masked_fill(entry.device_mask(grad.device), 0)
        return hook

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def _param_table(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """canonical name -> parameters (several when peft keeps an original and a trainable copy)."""
    adapter_ids = _adapter_param_ids(model)
    table: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) not in adapter_ids:
            table.setdefault(canonical_name(name), []).append(param)
    return table


def _attach_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], strict: bool) -> _MaskSet:
    table = _param_table(model)
    mask_set = _MaskSet()
    missing = []
    for name, mask in masks.items():
        params = table.get(canonical_name(name))
        if not params:
            missing.append(name)
            continue
        for i, param in enumerate(params):
            mask_set.set(f"{canonical_name(name)}#{i}", param, mask)
    if missing:
        msg = (f"{len(missing)} mask(s) match no parameter of the model (after removing peft/DDP "
               f"wrapper names), e.g. {missing[:3]}")
        if strict:
            raise KeyError(msg)
        logger.warning(msg)
    return mask_set


# --------------------------------------------------------------------------------------------
# Keeping a pruned model sparse while training
# --------------------------------------------------------------------------------------------

class MaskPreservingCallback(TrainerCallback):
    """Keep pruned weights exactly zero during ``Trainer`` fine-tuning.

    At ``on_train_begin`` the masks (given, or ``masks_from_zeros(model, include)``) are matched
    to the model's parameters by :func:`canonical_name`, so masks taken from the plain pruned
    model apply to its peft / DDP-wrapped version (``...q_proj.base_layer.weight``). Given masks
    are applied at once. Then, every step:

    * gradient hooks zero the pruned gradients as they are produced (so gradient clipping and
      accumulation see only live weights), and ``on_pre_optimizer_step`` zeroes them again;
    * ``on_optimizer_step`` re-applies the masks, which covers anything the optimizer moves
      regardless of gradients (decoupled weight decay, stale momentum);
    * optimizer moments at pruned positions are zeroed when training begins.

    With these, AdamW with weight decay, gradient accumulation, fp32/bf16/fp16 training and
    peft LoRA (base weights frozen; the adapters are never masked) all leave every pruned
    weight at exactly ``0``. For a plain training loop call :meth:`attach` once and
    :meth:`apply` after every ``optimizer.step()``.

    Args:
        masks: ``{parameter name: bool pruned-mask}``; ``None`` takes them from the zeros.
        include: regexes restricting ``masks_from_zeros`` (only when ``masks`` is None).
        mask_gradients: install the gradient hooks (re-masking after each step alone is enough
            for exact zeros; masking gradients also keeps the pruned weights out of the update
            statistics).
        strict: raise when a given mask matches no parameter (otherwise log a warning).
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None, include: Iterable[str] | None = None,
                 mask_gradients: bool = True, strict: bool = True):
        self.masks = dict(masks) if masks is not None else None
        self.include = include
        self.mask_gradients = mask_gradients
        self.strict = strict
        self._set: _MaskSet | None = None

    # -- plain-torch API ----------------------------------------------------------------------
    def attach(self, model: nn.Module, optimizer=None) -> None:
        """Resolve the masks on ``model``, zero the pruned weights and install gradient hooks."""
        self.detach()
        given = self.masks is not None
        masks = self.masks if given else masks_from_zeros(model, self.include)
        self._set = _attach_masks(model, masks, self.strict)
        if not self._set.entries:
            logger.warning("MaskPreservingCallback: no pruned weights found; nothing to preserve.")
        if given:
            self._set.apply()
        if self.mask_gradients:
            self._set.install_hooks()
        self._set.clear_optimizer_state(optimizer)
        logger.info("MaskPreservingCallback: preserving %d masked parameter(s).", len(self._set.entries))

    def apply(self) -> None:
        """Zero every pruned weight (call after each optimizer step in a plain loop)."""
        if self._set is not None:
            self._set.apply()

    def detach(self) -> None:
        """Remove the gradient hooks."""
        if self._set is not None:
            self._set.remove_hooks()

    @property
    def num_masked(self) -> int:
        return 0 if self._set is None else len(self._set.entries)

    # -- Trainer events -----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError("MaskPreservingCallback needs the model passed to on_train_begin.")
        self.attach(model, optimizer)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._set is not None:
            self._set.mask_grads()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.apply()

    def on_train_end(self, args, state, control, **kwargs):
        self.apply()
        self.detach()


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------

def merge_lora_keep_sparsity(peft_model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None,
                             *, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
    """Merge LoRA (or other peft) adapters into a pruned base model and keep it pruned.

    A LoRA delta ``B @ A`` is dense, so peft's ``merge_and_unload`` writes non-zeros into every
    pruned position. Here the masks of the adapted base weights are taken first (their exact
    zeros, or ``masks`` when given), the adapters are merged with ``merge_and_unload`` and the
    masks are re-applied: every merged weight becomes ``W + keep * delta`` with
    ``keep = ~pruned``, exactly the function of the adapter model with its delta masked.

    To keep the adapters unmerged instead, simply do not call this: the adapter model then runs
    ``W x + B A x`` with a sparse ``W``, which stays sparse on disk but whose effective weight is
    dense (and it is not the masked model this function returns).

    Returns:
        The unwrapped base model with merged weights (the peft wrapper should not be used after).
    """
    if not hasattr(peft_model, "merge_and_unload"):
        raise TypeError("merge_lora_keep_sparsity expects a peft model (with merge_and_unload).")
    if masks is None:
        try:
            from peft.tuners.tuners_utils import BaseTunerLayer
        except ImportError as exc:  # pragma: no cover - has merge_and_unload, so peft is there
            raise ImportError("merge_lora_keep_sparsity needs peft: pip install peft") from exc
        masks = {}
        with torch.no_grad():
            for mod_name, module in peft_model.named_modules():
                if isinstance(module, BaseTunerLayer):
                    weight = getattr(module.get_base_layer(), "weight", None)
                    if isinstance(weight, torch.Tensor):
                        mask = weight == 0
                        if bool(mask.any()):
                            masks[f"{mod_name}.weight"] = mask
    masks = {canonical_name(k): v.detach().clone() for k, v in masks.items()}
    kwargs = {"safe_merge": safe_merge}
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    merged = peft_model.merge_and_unload(**kwargs)
    mask_set = _attach_masks(merged, masks, strict=True)
    mask_set.apply()
    logger.info("Merged adapters and re-applied %d pruning mask(s).", len(mask_set.entries))
    return merged


# --------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Gradual pruning
# --------------------------------------------------------------------------------------------

def cubic_sparsity(step: int, initial_sparsity: float, final_sparsity: float, start_step: int,
                   end_step: int) -> float:
    """Cubic sparsity schedule of Zhu & Gupta (2017):
    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (end - t0))^3`` for ``t0 <= t <= end``,
    ``s_i`` before ``t0`` and ``s_f`` after ``end`` (``end - t0`` is the paper's ``n * Δt``)."""
    for value, label in ((initial_sparsity, "initial_sparsity"), (final_sparsity, "final_sparsity")):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{label} must be in [0, 1], got {value}.")
    if end_step < start_step:
        raise ValueError(f"end_step ({end_step}) must not be before start_step ({start_step}).")
    if step >= end_step:
        return float(final_sparsity)
    if step <= start_step:
        return float(initial_sparsity)
    frac = (step - start_step) / (end_step - start_step)
    return float(final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3)


_SCORES = ("magnitude", "movement", "taylor")
_SCOPES = ("layer", "row", "global")


class _Target:
    """A prunable weight seen as a ``[out, in]`` matrix (Conv2d flattened to ``[out, in*kh*kw]``,
    ``transformers`` Conv1D transposed from its ``[in, out]`` storage)."""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.weight: torch.Tensor = module.weight
        self.bias = getattr(module, "bias", None)
        self.transposed = isinstance(module, Conv1D)

    def to2d(self, t: torch.Tensor) -> torch.Tensor:
        return t.t() if self.transposed else t.reshape(t.shape[0], -1)

    def from2d(self, t: torch.Tensor) -> torch.Tensor:
        return t.t().contiguous() if self.transposed else t.reshape(self.weight.shape)

    @property
    def shape2d(self) -> tuple[int, int]:
        w = self.to2d(self.weight)
        return int(w.shape[0]), int(w.shape[1])


class GradualPruner:
    """Train-time gradual pruning for any ``nn.Module`` with Linear / Conv2d (/ Conv1D) layers.

    Call :meth:`step` with the number of optimizer steps done so far, after every
    ``optimizer.step()``. Every ``frequency`` steps from ``start_step`` (and once more at
    ``end_step``) it prunes to :func:`cubic_sparsity`; every call re-applies the masks, and
    gradient hooks zero pruned gradients, so pruned weights stay exactly zero. Masks only grow:
    already-pruned entries score ``-inf`` and are chosen first.

    Args:
        model: the model; targets are its Linear / Conv2d / Conv1D weights, minus peft adapter
            weights and the output embedding (``get_output_embeddings()``), filtered by
            ``include`` / ``exclude`` regexes searched in the module name.
        final_sparsity, initial_sparsity, start_step, end_step, frequency: the schedule.
        pattern: ``"unstructured"``; ``"N:M"`` (keep N of every M consecutive inputs of a row;
            there is no ramp: the final N:M pattern is applied at ``start_step`` and kept, the
            sparsity arguments are ignored); or ``"rows"`` (structured, MLP-neuron style: whole
            output rows / output channels, with their bias entries).
        score: ``"magnitude"`` |W| (row L2 norm for ``rows``); ``"movement"`` accumulated
            ``-W * grad`` (Sanh et al. 2020); ``"taylor"`` accumulated ``|W * grad|``. Gradient
            scores accumulate over every backward since the last prune and fall back to
            magnitude for weights that saw no gradient (frozen, or no step yet).
        scope: ``"layer"`` (each matrix to the target), ``"row"`` (every output row to the
            target, unstructured only) or ``"global"`` (one budget over all targets via
            :func:`hfprune.masks.global_budgets`; for ``rows`` the budget counts rows).
        optimizer: optional; its per-element state (Adam moments) is zeroed where weights are
            newly pruned. Conv2d rows are flattened in (in, kh, kw) order for N:M groups.
    """

    def __init__(self, model: nn.Module, final_sparsity: float = 0.5, *, initial_sparsity: float = 0.0,
                 start_step: int = 0, end_step: int = 1000, frequency: int = 100,
                 pattern: str = "unstructured", score: str = "magnitude", scope: str = "layer",
                 include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                 optimizer=None):
        self.structured = str(pattern).strip().lower() == "rows"
        self.pattern = None if self.structured else parse_pattern(pattern)
        if score not in _SCORES:
            raise ValueError(f"Unknown score {score!r}: use one of {_SCORES}.")
        if scope not in _SCOPES:
            raise ValueError(f"Unknown scope {scope!r}: use one of {_SCOPES}.")
        if self.structured and scope == "row":
            raise ValueError("scope='row' does not apply to pattern='rows'; use 'layer' or 'global'.")
        if frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {frequency}.")
        cubic_sparsity(start_step, initial_sparsity, final_sparsity, start_step, end_step)  # validates
        if final_sparsity >= 1.0:
            raise ValueError("final_sparsity must be < 1.")
        self.model = model
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.start_step, self.end_step, self.frequency = int(start_step), int(end_step), int(frequency)
        self.score, self.scope, self.optimizer = score, scope, optimizer
        if self.pattern is not None and self.pattern.is_nm and final_sparsity not in (0.5, self.pattern.sparsity):
            logger.info("GradualPruner: pattern %s fixes sparsity at %.3f; final_sparsity=%.3f is ignored.",
                        self.pattern, self.pattern.sparsity, final_sparsity)

        self.targets: dict[str, _Target] = {}
        self.skipped: list[str] = []
        self._find_targets(include, exclude)
        if not self.targets:
            raise ValueError("GradualPruner found no Linear / Conv2d / Conv1D weight to prune.")

        self._masks = _MaskSet()
        self._scores: dict[str, torch.Tensor] = {}
        self.last_prune_step: int | None = None
        self._warned_fallback = False
        for name, t in self.targets.items():
            self._masks.set(name, t.weight, torch.zeros_like(t.weight, dtype=torch.bool))
            self._masks.add_hook(name, self._accumulate if score != "magnitude" else None)
            if self.structured and isinstance(t.bias, torch.Tensor):
                key = f"{name}#bias"
                self._masks.set(key, t.bias, torch.zeros_like(t.bias, dtype=torch.bool))
                self._masks.add_hook(key)

    # -- setup --------------------------------------------------------------------------------
    def _find_targets(self, include, exclude) -> None:
        include = list(include) if include is not None else None
        exclude = list(exclude or ())
        out_emb = None
        if hasattr(self.model, "get_output_embeddings"):
            try:
                out_emb = self.model.get_output_embeddings()
            except (AttributeError, NotImplementedError):
                out_emb = None
        out_ids = {id(p) for p in out_emb.parameters()} if isinstance(out_emb, nn.Module) else set()
        for param_name, module, weight in _prunable_weights(self.model):
            mod_name = param_name[: -len(".weight")] if param_name.endswith(".weight") else ""
            if id(weight) in out_ids or not weight.is_floating_point():
                continue
            if (include is not None and not _matches(mod_name, include)) or _matches(mod_name, exclude):
                continue
            target = _Target(mod_name, module)
            if self.pattern is not None and self.pattern.is_nm and target.shape2d[1] % self.pattern.m:
                logger.warning("GradualPruner: skipping %s: input width %d is not a multiple of %d.",
                               mod_name, target.shape2d[1], self.pattern.m)
                self.skipped.append(mod_name)
                continue
            self.targets[mod_name] = target

    def _accumulate(self, key: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad():
            contrib = param.detach().float() * grad.detach().float()
            contrib = -contrib if self.score == "movement" else contrib.abs()
            acc = self._scores.get(key)
            self._scores[key] = contrib if acc is None else acc.add_(contrib)

    # -- schedule -----------------------------------------------------------------------------
    def target_sparsity(self, step: int) -> float:
        """The sparsity the schedule asks for after ``step`` optimizer steps."""
        if self.pattern is not None and self.pattern.is_nm:
            return float(self.pattern.sparsity)
        return cubic_sparsity(step, self.initial_sparsity, self.final_sparsity, self.start_step, self.end_step)

    def _due(self, step: int) -> bool:
        if step < self.start_step:
            return False
        last = self.last_prune_step
        if last is None:
            return True
        if last >= self.end_step:
            return False
        return step - last >= self.frequency or step >= self.end_step

    def step(self, global_step: int) -> bool:
        """Prune if the schedule says so at ``global_step``, then re-apply all masks.
        Returns whether it pruned."""
        pruned = False
        if self._due(global_step):
            self.prune(self.target_sparsity(global_step))
            self.last_prune_step = int(global_step)
            pruned = True
        self.apply_masks()
        return pruned

    # -- pruning ------------------------------------------------------------------------------
    def _score2d(self, name: str, target: _Target) -> torch.Tensor:
        acc = self._scores.get(name)
        if self.score == "magnitude" or acc is None:
            if self.score != "magnitude" and not self._warned_fallback:
                logger.warning("GradualPruner: no gradient seen for %s (frozen or before the first backward); "
                               "using magnitude scores for it.", name)
                self._warned_fallback = True
            base = target.weight.detach().float().abs()
            if self.structured:
                return target.to2d(base).pow(2).sum(1).sqrt()
            score = base
        else:
            score = acc.float()
            if self.structured:
                return target.to2d(score).sum(1)
        return target.to2d(score).clone()

    @torch.no_grad()
    def prune(self, sparsity: float) -> None:
        """Grow the masks to ``sparsity`` (ignored for N:M) and zero the newly pruned weights."""
        is_nm = self.pattern is not None and self.pattern.is_nm
        if sparsity <= 0.0 and not is_nm:
            return  # nothing to prune yet (the schedule starts at 0)
        old = {n: self._masks.entries[n].mask for n in self.targets}
        scores = {}
        for name, target in self.targets.items():
            s = self._score2d(name, target)
            old2d = target.to2d(old[name])
            if self.structured:
                s = s.masked_fill(old2d.all(1), float("-inf"))
            else:
                s = s.masked_fill(old2d, float("-inf"))
            scores[name] = s
        if self.scope == "global" and not is_nm:
            budgets = global_budgets(scores, sparsity)
            fractions = {n: budgets[n] / scores[n].numel() for n in scores}
        else:
            fractions = {n: sparsity for n in scores}

        newly = []
        for name, target in self.targets.items():
            s = scores[name]
            if self.structured:
                rows_pruned = layer_mask(s, fractions[name])
                mask2d = rows_pruned[:, None].expand(*target.shape2d)
            elif self.pattern.is_nm:
                mask2d = nm_mask(s, self.pattern.n, self.pattern.m)
            elif self.scope == "row":
                mask2d = row_mask(s, fractions[name])
            else:
                mask2d = layer_mask(s, fractions[name])
            mask = target.from2d(mask2d.to(old[name].device)) | old[name]
            self._masks.entries[name].mask = mask
            newly.append(name)
            if self.structured and f"{name}#bias" in self._masks.entries:
                self._masks.entries[f"{name}#bias"].mask = rows_pruned.to(target.bias.device)
                newly.append(f"{name}#bias")
        self._masks.apply()
        self._masks.clear_optimizer_state(self.optimizer, newly)
        if self.score == "taylor":
            self._scores.clear()  # Taylor importance is a window since the last prune
        if self._scores and self.score == "movement":
            for name, acc in self._scores.items():  # pruned entries no longer compete
                acc.masked_fill_(self._masks.entries[name].mask.to(acc.device), 0)
        logger.info("GradualPruner: pruned to %.4f (target %.4f, %s, score=%s, scope=%s).",
                    self.sparsity(), sparsity, "rows" if self.structured else self.pattern,
                    self.score, self.scope)

    # -- enforcement & inspection ---------------------------------------------------------------
    def apply_masks(self) -> None:
        """Zero every pruned weight (and pruned-row bias)."""
        self._masks.apply()

    def mask_grads(self) -> None:
        self._masks.mask_grads()

    def resume(self, global_step: int) -> None:
        """Rebuild masks from the model's zeros (e.g. after loading a checkpoint) and continue the
        schedule from ``global_step``."""
        with torch.no_grad():
            for name, target in self.targets.items():
                self._masks.entries[name].mask = target.weight == 0
        if global_step >= self.start_step:
            done = (min(global_step, self.end_step) - self.start_step) // self.frequency
            self.last_prune_step = self.start_step + done * self.frequency
            if global_step >= self.end_step:
                self.last_prune_step = self.end_step

    def remove_hooks(self) -> None:
        self._masks.remove_hooks()

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{module name: pruned-mask}`` of the weights (same shape as the weight)."""
        return {n: self._masks.entries[n].mask for n in self.targets}

    def layer_sparsity(self) -> dict[str, float]:
        return {n: float((t.weight == 0).sum().item()) / t.weight.numel() for n, t in self.targets.items()}

    def sparsity(self) -> float:
        """Fraction of exact zeros over all targeted weights."""
        zeros = sum(int((t.weight == 0).sum().item()) for t in self.targets.values())
        return zeros / max(1, sum(t.weight.numel() for t in self.targets.values()))


class GradualPruningCallback(TrainerCallback):
    """Run a :class:`GradualPruner` inside ``Trainer``.

    The pruner is built at ``on_train_begin`` (when the model and optimizer exist). Pruning steps
    happen at ``on_step_end`` with ``state.global_step`` (optimizer steps done); masks are
    re-applied at ``on_optimizer_step`` and pruned gradients are zeroed by hooks and again at
    ``on_pre_optimizer_step``. ``end_step=None`` ends the ramp at 75% of ``max_steps`` so the
    remaining quarter fine-tunes at the final sparsity. When training resumes from a checkpoint
    (``global_step > 0``) the masks are rebuilt from the model's zeros. Other arguments are those
    of :class:`GradualPruner`; the pruner is available as ``self.pruner``.
    """

    def __init__(self, final_sparsity: float = 0.5, *, initial_sparsity: float = 0.0, start_step: int = 0,
                 end_step: int | None = None, frequency: int = 100, pattern: str = "unstructured",
                 score: str = "magnitude", scope: str = "layer", include: Iterable[str] | None = None,
                 exclude: Iterable[str] | None = None):
        self.kwargs = dict(final_sparsity=final_sparsity, initial_sparsity=initial_sparsity, start_step=start_step,
                           frequency=frequency, pattern=pattern, score=score, scope=scope, include=include,
                           exclude=exclude)
        self.end_step = end_step
        self.pruner: GradualPruner | None = None
        cubic_sparsity(start_step, initial_sparsity, final_sparsity, start_step,
                       end_step if end_step is not None else start_step)  # validate early

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError("GradualPruningCallback needs the model passed to on_train_begin.")
        end = self.end_step
        if end is None:
            end = max(self.kwargs["start_step"], int(round(0.75 * state.max_steps)))
        if self.pruner is not None:
            self.pruner.remove_hooks()
        self.pruner = GradualPruner(model, end_step=end, optimizer=optimizer, **self.kwargs)
        if state.global_step > 0:
            self.pruner.resume(state.global_step)
        else:
            self.pruner.step(0)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.pruner is not None:
            self.pruner.mask_grads()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.pruner is not None:
            self.pruner.apply_masks()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.pruner is not None:
            if optimizer is not None:
                self.pruner.optimizer = optimizer
            self.pruner.step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.pruner is not None:
            self.pruner.apply_masks()
            self.pruner.remove_hooks()
            logger.info("GradualPruningCallback: final sparsity %.4f over %d layers.",
                        self.pruner.sparsity(), len(self.pruner.targets))
