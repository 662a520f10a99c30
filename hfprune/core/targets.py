"""Which linear layers a layer-wise method prunes, at what sparsity, and the checks on them
that run before any calibration (targets/ignore regexes, N:M widths, finite weights)."""

from __future__ import annotations

import re

import torch
from torch import nn

from hfprune.arch import find_linears, get_blocks, get_spec, in_features, weight_matrix
from hfprune.config import PruningConfig
from hfprune.core.allocation import expand_layer_sparsity
from hfprune.solvers.masks import parse_pattern

__all__ = ["name_matches", "select_targets", "layer_sparsities", "validate_pattern", "check_finite", "check_called"]


def name_matches(patterns: list[str], *names: str) -> bool:
    """Whether any regex in ``patterns`` fully matches any of ``names`` (a layer's full and in-block names)."""
    return any(re.fullmatch(p, n) for p in patterns for n in names)


def select_targets(model: nn.Module, config: PruningConfig) -> list[dict[str, nn.Module]]:
    """Per decoder block, the linear layers to prune, keyed by their full module name.

    ``config.targets`` / ``config.ignore`` regexes are matched (fully) against the full name
    (``model.layers.3.mlp.up_proj``) and the name inside the block (``mlp.up_proj``).
    Only layers inside decoder blocks are candidates: embeddings and ``lm_head`` stay dense.
    """
    spec = get_spec(model)
    blocks = get_blocks(model, spec)
    out = []
    for i, block in enumerate(blocks):
        chosen = {}
        for rel, module in find_linears(block).items():
            full = f"{spec.layers}.{i}.{rel}"
            if _is_router(spec, rel) and not name_matches([t for t in config.targets if t != ".*"], full, rel):
                continue  # MoE routers stay dense unless a target names them
            if name_matches(config.targets, full, rel) and not name_matches(config.ignore, full, rel):
                chosen[full] = module
        out.append(chosen)
    if not any(out):
        raise ValueError(
            f"No linear layer matches targets={config.targets} minus ignore={config.ignore}; "
            f"layer names look like {spec.layers}.0.<name>, e.g. {list(find_linears(blocks[0]))[:3]}."
        )
    return out


def _is_router(spec, rel: str) -> bool:
    return any(rel == r or rel.startswith(r + ".") for r in spec.routers)


def layer_sparsities(config: PruningConfig, targets: list[dict[str, nn.Module]]) -> dict[str, float]:
    """Target sparsity of every pruned layer (uniform unless ``config.layer_sparsity`` is set)."""
    result = {name: config.sparsity for block in targets for name in block}
    if config.layer_sparsity is not None:
        block_of = {name: i for i, block in enumerate(targets) for name in block}
        result.update(expand_layer_sparsity(config.layer_sparsity, list(result), block_of))
    return result


def validate_pattern(config: PruningConfig, targets: list[dict[str, nn.Module]]) -> None:
    pat = parse_pattern(config.pattern)
    if not pat.is_nm:
        return
    for block in targets:
        for name, module in block.items():
            width = in_features(module)
            if width % pat.m:
                raise ValueError(
                    f"pattern {config.pattern} needs every pruned layer's input width to be a multiple of {pat.m}, "
                    f"but {name} has {width} inputs: choose another M or add it to `ignore`."
                )


def check_finite(targets: list[dict[str, nn.Module]]) -> None:
    """NaN or Inf weights would be ranked and saved as if they were numbers: refuse them."""
    for block in targets:
        for name, module in block.items():
            W = weight_matrix(module)
            if W.device.type != "meta" and not bool(torch.isfinite(W).all()):
                bad = int((~torch.isfinite(W)).sum())
                raise ValueError(f"{name} has {bad} NaN/Inf weight(s): the checkpoint is damaged or was saved after a "
                                 f"diverged training step. Fix the weights before pruning, or leave "
                                 f"that layer dense with a regex in ignore= (--ignore).")


def check_called(modules: dict[str, nn.Module], seen) -> None:
    missing = sorted(set(modules) - set(seen))
    if missing:
        raise RuntimeError(
            f"Layer(s) {missing} never ran during calibration, so they cannot be pruned with data: "
            f"add them to `ignore`."
        )
