"""Pure math (tensors in, tensors out; no model access): mask selection, importance scores, the SparseGPT solver."""

from hfprune.solvers.admm import admm_prune
from hfprune.solvers.sparsegpt import quantize_weight, sparsegpt_prune

__all__ = ["admm_prune", "quantize_weight", "sparsegpt_prune"]
