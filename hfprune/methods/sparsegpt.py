"""SparseGPT (Frantar & Alistarh 2023): mask selection with an OBS update of the kept weights.

The solver itself is the pure function :func:`hfprune.solvers.sparsegpt.sparsegpt_prune`; this
file only wires it to the engine (Hessian statistics per layer input, config options).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hfprune.config import PruningConfig
from hfprune.registry import register_pruner
from hfprune.solvers.sparsegpt import output_error, sparsegpt_prune
from hfprune.stats import HessianStats
from hfprune.methods.base import Pruner, PruneResult


@dataclass
class SparseGPTConfig(PruningConfig):
    """SparseGPT one-shot pruning, optionally with joint quantization of the kept weights.

    Example:
        >>> from hfprune import SparseGPTConfig
        >>> SparseGPTConfig(pattern="2:4", bits=4, group_size=128).sparsity
        0.5
    """

    method: ClassVar[str] = "sparsegpt"

    block_size: int = field(default=128, metadata={"help": "Columns solved together (lazy batch updates)."})
    dampening: float = field(default=0.01, metadata={"help": "Added to the Hessian diagonal, as a fraction of its mean."})
    bits: int | None = field(default=None, metadata={"help": "Jointly quantize kept weights to 4 or 8 bits (fake-quantized in the model dtype)."})
    group_size: int | None = field(default=None, metadata={"help": "Quantization group size along the input (None: per output channel)."})
    sym: bool = field(default=True, metadata={"help": "Symmetric quantization grid."})
    act_order: bool = field(default=False, metadata={"help": "Solve the input columns in order of decreasing Hessian diagonal (N:M: whole groups)."})
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
        if self.bits is not None and self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 4 or 8 (or 2/3), got {self.bits}.")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive or None, got {self.group_size}.")
        if self.act_order and self.bits is not None and self.group_size is not None:
            raise ValueError("act_order cannot be combined with group_size quantization (groups would not be "
                             "consecutive inputs); drop one of them.")


@register_pruner("sparsegpt", config_cls=SparseGPTConfig)
class SparseGPTPruner(Pruner):
    requires_calibration = True

    def make_stats(self, in_features, device):
        return HessianStats(in_features, device=device)

    def score(self, W, stats):
        # SparseGPT's saliency with the damped inverse-Hessian diagonal is block-adaptive; for
        # global budgets the engine uses Wanda scores instead.
        raise NotImplementedError("SparseGPT chooses masks inside its solver.")

    def prune_weight(self, W, stats, sparsity, scope):
        c = self.config
        H = stats.hessian()
        new_w, pruned = sparsegpt_prune(W, H, sparsity, c.pattern, block_size=c.block_size,
                                        dampening=c.dampening, bits=c.bits, group_size=c.group_size, sym=c.sym,
                                        act_order=c.act_order)
        # How well the kept (and quantized) weights reproduce the layer's calibration outputs.
        return PruneResult(pruned=pruned, weight=new_w, info={"output_error": output_error(W, new_w, H)})
