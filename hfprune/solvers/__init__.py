"""Layer-wise reconstruction solvers (pure tensor functions, no model access)."""

from hfprune.solvers.admm import admm_prune
from hfprune.solvers.sparsegpt import HessianStats, quantize_weight, sparsegpt_prune

__all__ = ["admm_prune", "HessianStats", "quantize_weight", "sparsegpt_prune"]
