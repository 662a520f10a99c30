"""Checks of a multi-stage run (:func:`hfprune.prune` with a list of configs, a recipe's ``stages:``),
made before any stage runs: orders that cannot work are refused with the order that does.

* joint quantization (``bits``) is the last stage (a later stage would move weights off its grid);
* one stage removes weights (a second sparsity method would re-solve or re-rank what the first
  left); a quantization-only stage (``sparsity=0`` with ``bits``) after it keeps its zeros;
* after a stage that removed weights, no stage re-fits the kept weights (compensated structured
  pruning would fill the zeros back in) and, after an N:M stage, no stage changes input widths
  (removing columns breaks the groups of M);
* an N:M stage's layers have input widths divisible by M as the stages before it leave them.
"""

from __future__ import annotations

from torch import nn

from hfprune.arch import in_features
from hfprune.core.targets import select_targets
from hfprune.solvers.masks import parse_pattern

__all__ = ["check_stages"]


def check_stages(model: nn.Module, pruners: list) -> None:
    """Raise ``ValueError`` naming the fix when the stages cannot run in this order on ``model``."""
    names = [p.report_name for p in pruners]
    widths: dict[str, int] = {}  # layers whose input width an earlier stage changes -> the width after it
    removed_by = None  # the earlier stage that removed weights
    nm_by = None  # the earlier stage that made N:M groups
    for k, pruner in enumerate(pruners):
        this = f"stage {k + 1} ({names[k]})"
        if pruner.quantizes and k < len(pruners) - 1:
            raise ValueError(f"{this} quantizes the kept weights, so it must be the last stage: stage {k + 2} "
                             f"({names[k + 1]}) would move them off the grid. Move it to the end.")
        if pruner.model_level:
            pruner.check(model)  # the stage's own refusals, on the model as it is now
            changed = pruner.input_widths(model)
            if removed_by is not None:
                if pruner.refits_weights:
                    raise ValueError(f"{this} re-fits the kept weights by least squares, which would fill in the "
                                     f"zeros {removed_by} left: run it first, or with compensation='none'.")
                if changed and nm_by is not None:
                    raise ValueError(f"{this} removes input columns, which breaks the N:M groups {nm_by} "
                                     f"made: run it before that stage.")
            widths.update(changed)
            continue
        pattern = parse_pattern(pruner.config.pattern)
        if removed_by is not None and pruner.quantizes and not pruner.removes_weights \
                and not getattr(pruner, "fixed_mask_solver", False):
            raise ValueError(f"{this} quantizes without keeping the zeros {removed_by} left: use method "
                             f"'sparsegpt' with sparsity=0 and bits for a quantization-only stage.")
        if pruner.removes_weights:
            if removed_by is not None:
                raise ValueError(f"{this} and {removed_by} both remove weights; the second would re-rank or "
                                 f"re-solve what the first left. Use one sparsity stage (a quantization-only "
                                 f"stage, sparsity=0 with bits, may follow it).")
            removed_by = f"stage {k + 1} ({names[k]})"
            nm_by = removed_by if pattern.is_nm else None
        if pattern.is_nm:
            for block in select_targets(model, pruner.config):
                for name, module in block.items():
                    width = widths.get(name, in_features(module))
                    if width % pattern.m:
                        raise ValueError(
                            f"{this}: pattern {pruner.config.pattern} needs every pruned layer's input width to be a "
                            f"multiple of {pattern.m}, but the stages before it leave {name} with {width} inputs: "
                            f"choose ratios that keep a multiple of {pattern.m} (e.g. multiple_of={pattern.m} for "
                            f"hidden), or add the layer to the stage's ignore.")
