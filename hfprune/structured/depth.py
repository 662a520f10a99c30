"""Depth pruning: remove whole decoder blocks chosen by a measured criterion.

Criteria, measured on the calibration windows with the dense model:

* ``"block_influence"`` (ShortGPT, Men et al. 2024): for block ``i`` with input ``x_i`` and output
  ``x_{i+1}``, over all calibration tokens,

      BI_i = 1 - E_t[ cos(x_i,t, x_{i+1},t) ] ;

  the ``n`` blocks with the lowest influence are removed (they need not be adjacent).
* ``"angular"`` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"): the
  angular distance between the input of block ``l`` and the input of block ``l + n``,

      d(x_l, x_{l+n}) = E_t[ arccos(cos(x_l,t, x_{l+n},t)) ] / pi ,

  and the run of ``n`` consecutive blocks starting at ``argmin_l d`` is removed. It is measured on a
  seeded subsample of at most ``max_tokens`` calibration tokens per block boundary.
* ``"perplexity"`` (Kim et al. 2024, "Shortened LLaMA"): the calibration loss of the model with
  each block left out in turn; the ``n`` blocks whose removal raises it least are removed.

``keep_first`` / ``keep_last`` protect the outermost blocks (removing the last one usually hurts
most). The result is a physically shallower model whose config (layer count, per-layer lists,
MoE layer rules; :mod:`hfprune.arch.resize`) and attention ``layer_idx`` are rewritten, so stock
``AutoModelForCausalLM.from_pretrained`` reloads it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hfprune.config import KeepOrRatioConfig, renamed

logger = logging.getLogger(__name__)

__all__ = ["DepthPruningConfig", "CRITERIA", "block_influence", "angular_distance", "choose_blocks",
           "depth_scores", "remove_blocks"]

CRITERIA = ("block_influence", "angular", "perplexity")


@dataclass
class DepthPruningConfig(KeepOrRatioConfig):
    """Remove whole decoder blocks.

    Example:
        >>> from hfprune import DepthPruningConfig
        >>> cfg = DepthPruningConfig(keep_blocks=26)
        >>> cfg.importance, DepthPruningConfig.from_dict(cfg.to_dict()) == cfg
        ('block_influence', True)
    """

    method: ClassVar[str] = "depth"
    amount: ClassVar[tuple[str, str, str]] = ("keep_blocks", "depth_ratio", "blocks")
    deprecated_amounts: ClassVar[tuple[str, ...]] = ("num_blocks",)
    importances: ClassVar[tuple[str, ...]] = CRITERIA

    keep_blocks: int | None = field(default=None, metadata={
        "help": "Depth: decoder blocks kept (the new num_hidden_layers; if --depth-ratio is unset)."})
    depth_ratio: float | None = field(default=None, metadata={
        "help": "Depth: fraction of the decoder blocks to remove (rounded; if --keep-blocks is unset)."})
    importance: str = field(default="block_influence", metadata={
        "help": "Depth: block_influence (ShortGPT 1 - cos), angular (Gromov et al., a consecutive run) or "
                "perplexity (calibration loss with each block left out).", "choices": CRITERIA})
    keep_first: int = field(default=1, metadata={"help": "Depth: never remove the first K blocks."})
    keep_last: int = field(default=1, metadata={"help": "Depth: never remove the last K blocks."})
    max_tokens: int = field(default=8192, metadata={
        "help": "Depth, angular: calibration tokens per block boundary (a seeded subsample)."})
    num_blocks: int | None = field(default=None, metadata={
        "deprecated": "keep_blocks", "help": "Deprecated: blocks removed; use keep_blocks (blocks kept) or depth_ratio."})
    criterion: str | None = renamed("importance")

    def __post_init__(self) -> None:
        if self.num_blocks is not None:
            warnings.warn("`num_blocks` (blocks removed) is deprecated: every method's amounts now count what is "
                          "kept (keep_blocks, keep_hidden, keep_experts) or the fraction removed (*_ratio); use "
                          "keep_blocks = blocks - num_blocks, or depth_ratio.", FutureWarning, stacklevel=3)
        super().__post_init__()
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1 (blocks removed), got {self.num_blocks}.")
        if self.keep_first < 0 or self.keep_last < 0 or self.max_tokens < 1:
            raise ValueError("keep_first and keep_last must be >= 0 and max_tokens >= 1.")

    def blocks_to_remove(self, n_blocks: int) -> int:
        if self.keep_blocks is not None:
            if self.keep_blocks >= n_blocks:
                raise ValueError(f"keep_blocks={self.keep_blocks} keeps every one of the {n_blocks} blocks: keep fewer.")
            n = n_blocks - self.keep_blocks
        else:
            n = self.num_blocks if self.num_blocks is not None else int(round(self.depth_ratio * n_blocks))
        free = n_blocks - self.keep_first - self.keep_last
        if n < 1:
            raise ValueError(f"depth_ratio={self.depth_ratio} removes no block of {n_blocks}: raise it to at least "
                             f"{1 / n_blocks:.3f}.")
        if n > free:
            raise ValueError(f"Removing {n} of {n_blocks} blocks is not possible with keep_first={self.keep_first} and "
                             f"keep_last={self.keep_last}: at most {max(free, 0)} can go.")
        return n


# --------------------------------------------------------------------------------------------
# Pure math
# --------------------------------------------------------------------------------------------


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token cosine similarity of ``[..., hidden]`` tensors (float32)."""
    return F.cosine_similarity(a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1]), dim=-1, eps=1e-8)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """ShortGPT's ``1 - cos(x_in, x_out)`` per token (``[tokens]``)."""
    return 1.0 - _cos(x_in, x_out)


def angular_distance(x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
    """Gromov et al.'s ``arccos(cos(x_a, x_b)) / pi`` per token (``[tokens]``)."""
    return torch.arccos(_cos(x_a, x_b).clamp(-1.0, 1.0)) / math.pi


def choose_blocks(scores: list[float], n: int, keep_first: int, keep_last: int, consecutive: bool = False) -> list[int]:
    """Indices of the ``n`` blocks to remove: the lowest scores among the unprotected blocks, or
    (``consecutive``) the run ``[l, l + n)`` whose score ``scores[l]`` is lowest (ties: first)."""
    n_blocks = len(scores) if not consecutive else None
    if consecutive:
        # scores[l] = d(x_l, x_{l+n}) for l = 0 .. L - n
        total = len(scores) + n - 1
        starts = [l for l in range(len(scores)) if l >= keep_first and l + n <= total - keep_last]
        if not starts:
            raise ValueError(f"No run of {n} consecutive blocks avoids the protected first/last blocks.")
        best = min(starts, key=lambda l: (scores[l], l))
        return list(range(best, best + n))
    allowed = [i for i in range(n_blocks) if keep_first <= i < n_blocks - keep_last]
    order = sorted(allowed, key=lambda i: (scores[i], i))
    return sorted(order[:n])


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _boundary_scores(model: nn.Module, ids: torch.Tensor, n: int, max_tokens: int, seed: int, batch_size: int,
                     progress: bool) -> tuple[list[float], list[float]]:
    """(block influence of every block over all tokens, angular distance d(x_l, x_{l+n}) for every l
    over a token subsample), from one layer-by-layer pass."""
    from hfprune.core.runner import LayerRunner

    runner = LayerRunner(model, batch_size=batch_size)
    runner.capture(ids)
    n_blocks = len(runner)
    total = sum(h.shape[0] * h.shape[1] for h in runner.hidden)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(total, generator=g)[:min(max_tokens, total)].sort().values

    def sample() -> torch.Tensor:
        flat = torch.cat([h.reshape(-1, h.shape[-1]).float().cpu() for h in runner.hidden])
        return flat[pick]

    boundaries = [sample()]
    bi_sum = [0.0] * n_blocks

    def measure(i, before):
        bi_sum[i] = sum(float(block_influence(a, b).sum()) for a, b in zip(before, runner.hidden))
        boundaries.append(sample())

    runner.collect(None, after_block=measure, update_last=True, desc="hfprune depth scores", progress=progress)
    bi = [s / total for s in bi_sum]
    angular = [float(angular_distance(boundaries[l], boundaries[l + n]).mean()) for l in range(n_blocks - n + 1)]
    return bi, angular


@contextlib.contextmanager
def _without_block(model: nn.Module, index: int):
    """The model with block ``index`` left out of its block list and its per-layer config fields
    (Gemma-3 picks each block's mask by ``config.layer_types[i]``), for the duration."""
    from hfprune.arch import get_blocks, get_spec
    from hfprune.arch.base import _get_path
    from hfprune.arch.resize import remove_layers_from_config

    spec = get_spec(model)
    blocks = get_blocks(model, spec)
    owner_path, _, attr = spec.layers.rpartition(".")
    owner = _get_path(model, owner_path) if owner_path else model
    changes = remove_layers_from_config(model.config, [j for j in range(len(blocks)) if j != index])
    setattr(owner, attr, nn.ModuleList([b for j, b in enumerate(blocks) if j != index]))
    try:
        yield
    finally:
        setattr(owner, attr, blocks)
        for name, (before, _after) in changes.items():
            setattr(model.config, name, before)


@torch.no_grad()
def _loss(model: nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    from hfprune.core.runner import module_device

    device = module_device(model.get_input_embeddings())
    total, count = 0.0, 0
    for s in range(0, ids.shape[0], batch_size):
        batch = ids[s:s + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    return total / count


@torch.no_grad()
def _perplexity_scores(model: nn.Module, ids: torch.Tensor, batch_size: int, progress: bool) -> tuple[float, list[float]]:
    from tqdm.auto import tqdm

    from hfprune.arch import get_blocks

    base = _loss(model, ids, batch_size)
    out = []
    for i in tqdm(range(len(get_blocks(model))), desc="hfprune depth perplexity", disable=not progress, unit="block"):
        with _without_block(model, i):
            out.append(_loss(model, ids, batch_size) - base)
    return base, out


def depth_scores(model: nn.Module, ids: torch.Tensor, config: DepthPruningConfig, *, seed: int = 0,
                 batch_size: int = 4, progress: bool = False) -> dict[str, Any]:
    """Measure the criterion on ``ids`` and choose the blocks to remove (nothing is changed)."""
    from hfprune.arch import get_blocks

    n_blocks = len(get_blocks(model))
    n = config.blocks_to_remove(n_blocks)
    out: dict[str, Any] = {}
    if config.importance == "perplexity":
        base, delta = _perplexity_scores(model, ids, batch_size, progress)
        out.update(base_loss=base, loss_increase=delta)
        remove = choose_blocks(delta, n, config.keep_first, config.keep_last)
        scores = delta
    else:
        bi, angular = _boundary_scores(model, ids, n, config.max_tokens, seed, batch_size, progress)
        out.update(block_influence=bi, angular_distance=angular)
        if config.importance == "block_influence":
            remove, scores = choose_blocks(bi, n, config.keep_first, config.keep_last), bi
        else:
            remove = choose_blocks(angular, n, config.keep_first, config.keep_last, consecutive=True)
            scores = angular
    out.update(removed=remove, scores=scores)
    return out


# --------------------------------------------------------------------------------------------
# Surgery
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def remove_blocks(model: nn.Module, remove: list[int]) -> dict[str, Any]:
    """Drop the decoder blocks ``remove`` from ``model`` in place, renumber the kept blocks and
    rewrite the config (see :mod:`hfprune.arch.resize`); returns the config changes."""
    from hfprune.arch import get_blocks, get_spec
    from hfprune.arch.base import _get_path
    from hfprune.arch.resize import layer_order_warnings, reindex_block, remove_layers_from_config

    spec = get_spec(model)
    if spec.stacks:
        raise ValueError("Depth pruning supports decoder-only models (one block stack).")
    blocks = get_blocks(model, spec)
    remove = sorted(set(int(i) for i in remove))
    if not remove or remove[0] < 0 or remove[-1] >= len(blocks):
        raise ValueError(f"remove={remove} is not a set of block indices of this {len(blocks)}-block model.")
    keep = [i for i in range(len(blocks)) if i not in remove]
    if not keep:
        raise ValueError("Removing every decoder block leaves no model; remove fewer blocks.")
    for warning in layer_order_warnings(model.config):
        logger.warning("Depth pruning: %s.", warning)
    changes = remove_layers_from_config(model.config, keep)
    owner_path, _, attr = spec.layers.rpartition(".")
    owner = _get_path(model, owner_path) if owner_path else model
    kept = nn.ModuleList([blocks[i] for i in keep])
    for new, block in enumerate(kept):
        reindex_block(block, new)
    setattr(owner, attr, kept)
    return {field: {"before": b, "after": a} for field, (b, a) in changes.items()}
