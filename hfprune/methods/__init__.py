"""Built-in pruning methods; importing this package registers them."""

from hfprune.methods.base import Pruner, PruneResult
from hfprune.methods.magnitude import MagnitudeConfig, MagnitudePruner
from hfprune.methods.wanda import WandaConfig, WandaPruner
from hfprune.methods.sparsegpt import SparseGPTConfig, SparseGPTPruner
from hfprune.methods.structured import StructuredConfig, StructuredPruner
from hfprune.methods.admm import ADMMConfig, ADMMPruner
from hfprune.methods.resize import DepthPruner, HiddenPruner

__all__ = ["Pruner", "PruneResult", "MagnitudeConfig", "MagnitudePruner", "WandaConfig", "WandaPruner", "SparseGPTConfig",
           "SparseGPTPruner", "StructuredConfig", "StructuredPruner", "ADMMConfig", "ADMMPruner",
           "DepthPruner", "HiddenPruner"]
