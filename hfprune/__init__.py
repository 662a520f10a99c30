"""hfprune: prune Hugging Face language models and save checkpoints that stay standard.

Example:
    >>> import hfprune
    >>> hfprune.WandaConfig(sparsity=0.5).method
    'wanda'
"""

__version__ = "0.1.0"

import logging as _logging

from . import formats as _formats  # noqa: F401  (registers the hfprune-sparse checkpoint loader)
from .architectures import ArchSpec, register_architecture
from .config import CalibrationConfig, PruningConfig
from .engine import prune
from .evaluation import evaluate, perplexity
from .expert_pruning import ExpertPruningConfig
from .io import save_pretrained, save_pruned
from .models import load_model, load_tokenizer
from .pruners import MagnitudeConfig, SparseGPTConfig, WandaConfig
from .recipes import load_recipe
from .registry import available_methods, register_pruner
from .report import PruneReport

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "ArchSpec",
    "CalibrationConfig",
    "ExpertPruningConfig",
    "MagnitudeConfig",
    "PruneReport",
    "PruningConfig",
    "SparseGPTConfig",
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
