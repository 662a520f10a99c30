"""Evaluation: perplexity with the pinned protocol (:mod:`~hfprune.eval.perplexity`), zero-shot
benchmarks through lm-evaluation-harness on local task data (:mod:`~hfprune.eval.harness`), and the
synthetic offline cloze task (:mod:`~hfprune.eval.zeroshot`)."""

from hfprune.eval.harness import SUITES, available_tasks, expand_tasks, zeroshot_evaluate

__all__ = ["SUITES", "available_tasks", "expand_tasks", "zeroshot_evaluate"]
