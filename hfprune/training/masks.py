"""Masks of a pruned model during training: derived from its zeros, kept zero by a ``Trainer`` callback.

Masks follow :mod:`hfprune.solvers.masks`: boolean tensors, ``True`` where a weight is pruned, counts exact.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from hfprune.report import zero_counts
from transformers import TrainerCallback
from transformers.pytorch_utils import Conv1D


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
    report = zero_counts((name, weight) for name, _, weight in _prunable_weights(model, include))
    logger.info("sparsity: %.4f (%d / %d weights zero in %d layers)", report["sparsity"], report["zeros"],
                report["numel"], len(report["layers"]))
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
