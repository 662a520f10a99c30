"""Built-in pruning methods; importing this package registers them."""

from .base import Pruner, PruneResult
from .magnitude import MagnitudeConfig, MagnitudePruner
from .wanda import WandaConfig, WandaPruner
from .sparsegpt import SparseGPTConfig, SparseGPTPruner
from .admm import ADMMConfig, ADMMPruner

__all__ = ["Pruner", "PruneResult", "MagnitudeConfig", "MagnitudePruner", "WandaConfig", "WandaPruner", "SparseGPTConfig",
           "SparseGPTPruner", "ADMMConfig", "ADMMPruner"]
