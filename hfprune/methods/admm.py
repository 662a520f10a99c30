"""ADMM pruning (Boža 2024): the layer-wise reconstruction solved by ADMM with a gradual mask.

The solver is the pure function :func:`hfprune.solvers.admm.admm_prune`; this file only wires it
to the engine. It needs exactly SparseGPT's statistics (one Hessian per layer input, merged across
processes like SparseGPT's), so it runs in the same layer-sequential engine and memory bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hfprune.solvers.masks import parse_pattern
from hfprune.registry import register_pruner
from hfprune.solvers.admm import admm_prune
from hfprune.methods.base import HessianPruner, HessianPrunerConfig, dense_targets_field


@dataclass
class ADMMConfig(HessianPrunerConfig):
    """ADMM one-shot pruning with a gradually growing mask, optionally with joint quantization.

    Unstructured masks are compared over the whole matrix by default (``scope="layer"``, which
    measured better than per row for this method); N:M ignores the scope.

    Example:
        >>> from hfprune import ADMMConfig
        >>> ADMMConfig(pattern="2:4").sparsity
        0.5
        >>> ADMMConfig(sparsity=0.7).scope
        'layer'
    """

    method: ClassVar[str] = "admm"

    scope: str = field(
        default="layer",
        metadata={"help": "Comparison group of the unstructured mask: 'layer' (default for admm), 'row' or 'global'."},
    )
    iterations: int = field(default=10, metadata={"help": "ADMM iterations per layer (each costs one matmul with the Hessian)."})
    prune_iterations: int = field(default=7, metadata={"help": "Of these, how many grow the mask (cubic schedule); it is fixed after."})
    rho: float = field(default=1.0, metadata={"help": "ADMM penalty, relative to the unit diagonal of the normalised Hessian."})
    dampening: float = field(default=0.1, metadata={"help": "Ridge added to the normalised Hessian's diagonal (pulls towards the dense weights)."})
    dense_targets: str = dense_targets_field("block")

    def __post_init__(self) -> None:
        # N:M has no comparison scope; the shared check insists on the neutral 'row' there.
        if parse_pattern(self.pattern).is_nm and self.scope == "layer":
            self.scope = "row"
        super().__post_init__()
        if self.iterations < 1 or not 0 <= self.prune_iterations <= self.iterations:
            raise ValueError(f"need iterations >= 1 and 0 <= prune_iterations <= iterations, got {self.iterations} "
                             f"and {self.prune_iterations}.")
        if not self.rho > 0:
            raise ValueError(f"rho must be positive, got {self.rho}.")
        if not 0.0 <= self.dampening < 10.0:
            raise ValueError(f"dampening must be in [0, 10) (relative to the unit diagonal), got {self.dampening}.")


@register_pruner("admm", config_cls=ADMMConfig)
class ADMMPruner(HessianPruner):
    """ADMM: unstructured / N:M with a gradually grown mask on SparseGPT's Hessians (optional joint quantization)."""

    def solve(self, W, H, sparsity, scope):
        c = self.config
        return admm_prune(W, H, sparsity, c.pattern, scope=scope, iterations=c.iterations,
                          prune_iterations=c.prune_iterations, rho=c.rho, dampening=c.dampening,
                          bits=c.bits, group_size=c.group_size, sym=c.sym, act_order=c.act_order,
                          return_scale=True)
