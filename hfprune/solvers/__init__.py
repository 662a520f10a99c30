"""Layer-wise reconstruction solvers (pure tensor functions, no model access)."""

from hfprune.solvers.sparsegpt import HessianStats, quantize_weight, sparsegpt_prune

__all__ = ["HessianStats", "quantize_weight", "sparsegpt_prune"]
