"""SparseGPT (Frantar & Alistarh 2023): mask selection with an OBS update of the kept weights.

The solver itself is the pure function :func:`hfprune.solvers.sparsegpt.sparsegpt_prune`; this
file only gives its config options (the engine glue is :class:`hfprune.methods.base.HessianPruner`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hfprune.registry import register_pruner
from hfprune.solvers.sparsegpt import sparsegpt_prune
from hfprune.methods.base import HessianPruner, HessianPrunerConfig, dense_targets_field


@dataclass
class SparseGPTConfig(HessianPrunerConfig):
    """SparseGPT one-shot pruning, optionally with joint quantization of the kept weights.

    Example:
        >>> from hfprune import SparseGPTConfig
        >>> SparseGPTConfig(pattern="2:4", bits=4, group_size=128).sparsity
        0.5
    """

    method: ClassVar[str] = "sparsegpt"

    block_size: int = field(default=128, metadata={"help": "Columns solved together (lazy batch updates)."})
    dampening: float = field(default=0.01, metadata={"help": "Added to the Hessian diagonal, as a fraction of its mean."})
    dense_targets: str = dense_targets_field("off")
    true_sequential: bool = field(
        default=False,
        metadata={"help": "Default False, as in the SparseGPT paper's code and llm-compressor: every layer of a block gets "
                          "its Hessian from the block's inputs before any of its layers is pruned (one statistics pass, "
                          "then one pass for the pruned outputs). True prunes the layers in call order, each from "
                          "inputs through the already pruned layers (GPTQ's true-sequential; docs/BENCHMARKS.md "
                          "compares the two per family)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}.")
        if not 0.0 <= self.dampening < 1.0:
            raise ValueError(f"dampening must be in [0, 1) (a fraction of the mean Hessian diagonal), got {self.dampening}.")


@register_pruner("sparsegpt", config_cls=SparseGPTConfig)
class SparseGPTPruner(HessianPruner):
    """SparseGPT: unstructured / N:M with OBS reconstruction; bits: joint quantization (sparsity=0: GPTQ only)."""

    fixed_mask_solver = True

    def solve(self, W, H, sparsity, scope, mask=None):
        c = self.config
        return sparsegpt_prune(W, H, sparsity, c.pattern, block_size=c.block_size, dampening=c.dampening,
                               bits=c.bits, group_size=c.group_size, sym=c.sym, act_order=c.act_order,
                               return_scale=True, mask=mask)
