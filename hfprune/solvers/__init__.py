"""Pure math (tensors in, tensors out; no model access): mask selection, importance scores, quantization, the SparseGPT and ADMM solvers."""

from hfprune.solvers.admm import admm_prune
from hfprune.solvers.quant import quantize_weight
from hfprune.solvers.sparsegpt import sparsegpt_prune

__all__ = ["admm_prune", "quantize_weight", "sparsegpt_prune"]
