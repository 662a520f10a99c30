"""Evaluation: perplexity with the pinned protocol (:mod:`~hfprune.eval.perplexity`), zero-shot
benchmarks through lm-evaluation-harness on local task data (:mod:`~hfprune.eval.zeroshot`), and the
synthetic offline cloze task (:mod:`~hfprune.eval.cloze`)."""

from hfprune.eval.zeroshot import SUITES, available_tasks, expand_tasks, zeroshot_evaluate

__all__ = ["SUITES", "available_tasks", "expand_tasks", "zeroshot_evaluate"]
