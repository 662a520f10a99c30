"""Evaluation: zero-shot benchmarks through lm-evaluation-harness (:mod:`hfprune.eval.harness`).

Perplexity lives in :mod:`hfprune.evaluation`; :func:`hfprune.evaluate` runs either or both.
"""

from .harness import SUITES, available_tasks, expand_tasks, zeroshot_evaluate

__all__ = ["SUITES", "available_tasks", "expand_tasks", "zeroshot_evaluate"]
