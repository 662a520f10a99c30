"""Evaluation: perplexity with the pinned protocol (:mod:`~hfprune.eval.perplexity`) and zero-shot tasks (:mod:`~hfprune.eval.zeroshot`)."""
