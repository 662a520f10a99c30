"""Calibration samples: ``nsamples`` windows of ``seqlen`` tokens, chosen reproducibly.

The sampling follows Wanda/SparseGPT: pick a random document with more than ``seqlen`` tokens,
then a random window of ``seqlen`` tokens inside it, with a fixed seed. When no document is long
enough (line-per-document text files, short strings) the documents are joined with ``"\\n\\n"``
and the windows are drawn from that stream instead.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
from torch import nn

from hfprune.config import CalibrationConfig
from hfprune.core.checks import check_token_ids
from hfprune.core.runner import module_device
from hfprune.data import load_texts

logger = logging.getLogger(__name__)

__all__ = ["get_calibration_ids", "sample_windows", "self_generated_ids", "resolve_calibration", "calibration_batch_size",
           "CPU_BATCH_TOKENS"]

_TOKENIZE_ALL_LIMIT = 20_000  # documents; above this, tokenize lazily while sampling
# Characters per needed token beyond which a document (or the joined text) is cut before tokenizing:
# far more than any text needs (about 4 characters a token), so normal data sets are untouched, while
# a 50 MB one-line file is not tokenized whole for a few windows.
_CHARS_PER_TOKEN_CAP = 64
_JOINED_CHARS_MIN = 8_000_000  # the joined text is cut only beyond this (WikiText-2 test is 1.3 M characters)


def _tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]


def _too_few(total: int, nsamples: int, seqlen: int) -> ValueError:
    return ValueError(
        f"The calibration data has {total} tokens, fewer than nsamples x seqlen = {nsamples} x {seqlen} = "
        f"{nsamples * seqlen}: lower nsamples/seqlen (--nsamples/--seqlen) or give more text."
    )


def sample_windows(tokenizer, texts: list[str], nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids drawn from ``texts`` by the papers' protocol."""
    if not texts:
        raise ValueError("The calibration data is empty: give at least one non-empty document.")
    cap = _CHARS_PER_TOKEN_CAP * nsamples * (seqlen + 1)
    if any(len(t) > cap for t in texts):
        logger.info("Reading at most the first %d characters of each calibration document.", cap)
        texts = [t[:cap] for t in texts]
    rng = random.Random(seed)
    lengths: dict[int, list[int]] = {}
    if len(texts) <= _TOKENIZE_ALL_LIMIT:
        encoded = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
        lengths = dict(enumerate(encoded))
        total = sum(len(ids) for ids in encoded)
        if total < nsamples * seqlen:
            raise _too_few(total, nsamples, seqlen)
        long_docs = sum(1 for ids in encoded if len(ids) > seqlen)
    else:
        long_docs = None  # unknown: sample lazily

    windows = []
    if long_docs != 0:
        max_tries = 100 * nsamples + len(texts)
        tries = 0
        while len(windows) < nsamples:
            tries += 1
            if tries > max_tries:
                raise ValueError(
                    f"Found too few documents longer than seqlen={seqlen} tokens after {max_tries} draws: "
                    f"lower seqlen or use longer documents."
                )
            i = rng.randint(0, len(texts) - 1)
            ids = lengths.get(i)
            if ids is None:
                ids = lengths[i] = _tokenize(tokenizer, texts[i])
            if len(ids) <= seqlen:
                continue
            start = rng.randint(0, len(ids) - seqlen - 1)
            windows.append(ids[start:start + seqlen])
    else:
        logger.info("No document is longer than %d tokens: sampling windows from the joined text.", seqlen)
        joined = "\n\n".join(texts)
        stream = _tokenize(tokenizer, joined[:max(16 * cap, _JOINED_CHARS_MIN)])
        if len(stream) < nsamples * seqlen:
            raise _too_few(len(stream), nsamples, seqlen)
        for _ in range(nsamples):
            start = rng.randint(0, len(stream) - seqlen)
            windows.append(stream[start:start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


@torch.no_grad()
def self_generated_ids(model, tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                       batch_size: int = 8) -> torch.Tensor:
    """Calibration text sampled from the model itself (for when no data is at hand).

    Each sample starts from the BOS token (or a random vocabulary token when the tokenizer has
    none) and is sampled with temperature 1 and top-k 50.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    device = module_device(model.get_input_embeddings())  # not a disk-offloaded (meta) weight's device
    vocab = model.config.get_text_config().vocab_size
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    rows = []
    try:
        for start in range(0, nsamples, batch_size):
            n = min(batch_size, nsamples - start)
            first = torch.full((n, 1), bos, dtype=torch.long) if bos is not None else torch.randint(0, vocab, (n, 1))
            out = model.generate(first.to(device), attention_mask=torch.ones_like(first).to(device),
                                 do_sample=True, top_k=50, temperature=1.0, max_new_tokens=seqlen - 1,
                                 min_new_tokens=seqlen - 1, pad_token_id=bos if bos is not None else 0)
            rows.append(out[:, :seqlen].cpu())
    finally:
        torch.random.set_rng_state(generator_state)
    return torch.cat(rows)


class InputBatches(list):
    """Calibration given as model inputs: a list of dicts, each one batch of keyword arguments of the
    model's forward (``{"pixel_values": ...}``, ``{"input_ids": ..., "labels": ...}``). ``shape[0]`` is
    the number of batches, so the engine runs them one call at a time."""

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), 1)

    def __getitem__(self, index):
        if isinstance(index, (list, tuple, torch.Tensor)):
            return InputBatches(list.__getitem__(self, int(i)) for i in index)
        item = list.__getitem__(self, index)
        return InputBatches(item) if isinstance(index, slice) else item

    def numel(self) -> int:
        return sum(int(v.numel()) for batch in self for v in batch.values() if isinstance(v, torch.Tensor))


def input_batches(source) -> InputBatches | None:
    """``source`` as :class:`InputBatches` when it is a list of dicts or a data loader (any iterable
    that is not a string or a tensor) of dicts; ``None`` for every other calibration source."""
    from collections.abc import Iterable, Mapping

    if isinstance(source, (str, bytes, torch.Tensor, Mapping)) or not isinstance(source, Iterable):
        return None
    if isinstance(source, (list, tuple)) and (not source or not isinstance(source[0], Mapping)):
        return None
    batches = InputBatches(dict(b) for b in source)
    bad = [type(b).__name__ for b in batches if not all(isinstance(k, str) for k in b)]
    if not batches or bad:
        raise ValueError("Calibration batches must be dicts of model inputs (e.g. {'pixel_values': tensor}); got "
                         f"{'nothing' if not batches else bad[0]}.")
    return batches


def get_calibration_ids(calibration: CalibrationConfig, tokenizer=None, model=None) -> torch.Tensor:
    """Token ids ``[nsamples, seqlen]`` for ``calibration`` (or its :class:`InputBatches`, when it is
    a list or data loader of model-input dicts)."""
    source = calibration.dataset
    batches = input_batches(source)
    if batches is not None:
        return batches
    if isinstance(source, torch.Tensor):
        ids = check_token_ids(source, model)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2:
            raise ValueError(f"Calibration token ids must be [nsamples, seqlen], got shape {tuple(ids.shape)}.")
        return ids
    if model is not None:
        check_token_ids(torch.zeros(1, dtype=torch.long), model)  # a model that reads no token ids: say so first
    if isinstance(source, str) and source == "self":
        if model is None:
            raise ValueError("calibration='self' samples text from the model: pass the model.")
        logger.info("Generating %d x %d calibration tokens from the model itself.", calibration.nsamples, calibration.seqlen)
        return self_generated_ids(model, tokenizer, calibration.nsamples, calibration.seqlen, calibration.seed)
    if tokenizer is None:
        raise ValueError("Text calibration data needs a tokenizer: pass `tokenizer=` (or token ids as a tensor).")
    texts = load_texts(source, split=calibration.split, text_column=calibration.text_column,
                       config_name=calibration.config_name)
    return check_token_ids(sample_windows(tokenizer, texts, calibration.nsamples, calibration.seqlen, calibration.seed),
                           model, "The tokenizer's ids")


def resolve_calibration(calibration: Any = None, **overrides) -> CalibrationConfig:
    """A :class:`CalibrationConfig` from a config, a dict, a source (name/path/list/tensor) or ``None``."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(calibration, CalibrationConfig):
        base = calibration.to_dict()
        base["dataset"] = calibration.dataset
    elif isinstance(calibration, dict):
        base = dict(calibration)
    elif calibration is None:
        base = {}
    else:
        base = {"dataset": calibration}
    base.update(overrides)
    if isinstance(base.get("dataset"), torch.Tensor):
        ids = base["dataset"]
        base.setdefault("nsamples", int(ids.shape[0]) if ids.dim() == 2 else 1)
        base.setdefault("seqlen", int(ids.shape[-1]))
    return CalibrationConfig.from_dict(base)



# Tokens per block call on CPU when a block takes several passes anyway: small batches keep the
# element-wise work (norms, rotary embeddings, activations) in cache. On SmolLM2-135M (2-core CPU)
# the model body over 64 x 512 tokens took 54-63 s in batches of 2-8 windows (1024-4096 tokens)
# and 75.7 s as one 32768-token batch; `scripts/bench_oneshot.py --runs forward` times the whole
# model at batch 8 and at batch 64.
CPU_BATCH_TOKENS = 2048


def calibration_batch_size(calib: CalibrationConfig, ids: torch.Tensor, model: nn.Module, low_memory: bool = False,
                one_pass: bool = True) -> int:
    """Calibration windows per block call: the configured value, or (``batch_size=0``, the
    default) an automatic choice.

    ``one_pass`` (true-sequential pruning in one process): as many windows as fit a memory
    budget for the block's intermediate activations, so that when all of them fit, each block is
    pruned in a single pass. Otherwise each block is run more than once anyway, and on CPU the
    batch holds about :data:`CPU_BATCH_TOKENS` tokens, which runs faster than one large batch.

    ``low_memory`` (streaming): the budget is the size of the hidden states that are kept
    anyway (``nsamples x seqlen x hidden`` in the model dtype; at least 64 MB), so the block's
    working memory stays about the size of the calibration activations whatever the model width;
    when that splits the windows into several batches, each block takes one pass per
    true-sequential group instead of one pass."""
    if calib.batch_size:
        return calib.batch_size
    if not isinstance(ids, torch.Tensor):
        return 1  # model-input dicts: each one is a batch
    from hfprune.arch.discovery import activation_sizes

    hidden, inter, heads = activation_sizes(model.config)
    seqlen = ids.shape[1]
    bytes_per_token = 4 * (6 * hidden + 4 * inter + 2 * heads * seqlen)
    device = module_device(model.get_input_embeddings())
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = 0.25 * free
    else:
        import psutil

        budget = min(4 * 2**30, 0.25 * psutil.virtual_memory().available)
    if low_memory:
        dtype_bytes = next(model.parameters()).element_size()
        budget = min(budget, max(64 * 2**20, dtype_bytes * hidden * ids.numel()))
    per_window = bytes_per_token * seqlen
    windows = int(max(1, min(ids.shape[0], budget // per_window)))
    if not one_pass and device.type != "cuda":
        windows = min(windows, max(1, CPU_BATCH_TOKENS // seqlen))
    return windows
