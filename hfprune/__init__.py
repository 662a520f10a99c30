"""hfprune: prune Hugging Face language models and save checkpoints that stay standard.

Example:
    >>> import hfprune
    >>> hfprune.WandaConfig(sparsity=0.5).method
    'wanda'
"""

import logging as _logging

from hfprune.arch import ArchSpec, register_architecture
from hfprune.config import CalibrationConfig, PruningConfig, __version__
from hfprune import formats as _formats  # noqa: F401  (registers the formats and the hfprune-sparse loader)
from hfprune.core.engine import prune
from hfprune.eval.perplexity import evaluate, perplexity
from hfprune.io import save_pretrained, save_pruned
from hfprune.models import load_model, load_tokenizer
from hfprune.methods import ADMMConfig, MagnitudeConfig, SparseGPTConfig, StructuredConfig, WandaConfig
from hfprune.recipes import load_recipe
from hfprune.registry import available_methods, register_pruner
from hfprune.report import PruneReport
from hfprune.structured.experts import ExpertPruningConfig
from hfprune.structured.depth import DepthPruningConfig
from hfprune.structured.hidden import HiddenPruningConfig

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "ArchSpec",
    "CalibrationConfig",
    "DepthPruningConfig",
    "ExpertPruningConfig",
    "HiddenPruningConfig",
    "MagnitudeConfig",
    "PruneReport",
    "PruningConfig",
    "SparseGPTConfig",
    "StructuredConfig",
    "ADMMConfig",
    "WandaConfig",
    "available_methods",
    "evaluate",
    "load_model",
    "load_recipe",
    "load_tokenizer",
    "perplexity",
    "prune",
    "register_architecture",
    "register_pruner",
    "save_pretrained",
    "save_pruned",
]
