"""Workflows built on prune and save: sweep and search, recovery fine-tuning, streaming (low-memory) pruning."""
