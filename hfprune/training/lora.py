"""Merge LoRA adapters into a pruned base model without filling the pruned positions back in."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from hfprune.training.masks import _attach_masks, canonical_name

logger = logging.getLogger(__name__)


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
