"""Evaluation with a pinned protocol.

Perplexity follows Wanda/SparseGPT: the evaluation text is ``"\\n\\n".join(rows)`` of the test
split, tokenised once, cut into non-overlapping windows of ``seqlen`` tokens (the last partial
window is dropped), and ``ppl = exp(mean over windows of the mean token NLL)``.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hfprune.arch import check_seqlen, max_positions
from hfprune.core.checks import check_loaded, check_token_ids
from hfprune.core.runner import module_device
from hfprune.data import load_eval_text
from hfprune.eval.zeroshot import check_task_files, check_zeroshot_args, zeroshot_evaluate
from hfprune.report import layer_sparsity_report

logger = logging.getLogger(__name__)

__all__ = ["perplexity", "evaluate", "eval_token_ids"]


def eval_token_ids(tokenizer, dataset="wikitext2", *, split: str = "test", text_column: str = "text",
                   config_name: str | None = None) -> torch.Tensor:
    """The whole evaluation text as one row of token ids ``[1, T]``."""
    if isinstance(dataset, torch.Tensor):
        return check_token_ids(dataset, None, "Evaluation token ids").reshape(1, -1)
    text = load_eval_text(dataset, split=split, text_column=text_column, config_name=config_name)
    return torch.tensor([tokenizer(text, verbose=False)["input_ids"]], dtype=torch.long)


def resolve_eval_seqlen(config, seqlen: int | None = None) -> int | None:
    """``seqlen``, or for ``None`` the protocol's 2048 tokens or the model's positions when fewer."""
    if seqlen is not None:
        return seqlen
    limit = max_positions(config)
    if limit is not None and limit < 2048:
        logger.info("Evaluating in windows of %d tokens, the model's positions (the protocol's 2048 is longer).", limit)
        return limit
    return 2048


@torch.no_grad()
def perplexity(model, tokenizer=None, dataset="wikitext2", *, seqlen: int | None = 2048, max_windows: int | None = None,
               split: str = "test", text_column: str = "text", config_name: str | None = None,
               progress: bool = True, token_ids: torch.Tensor | None = None) -> dict:
    """Perplexity of ``model`` on ``dataset`` with the papers' protocol.

    ``seqlen=None`` takes 2048 or the model's positions, whichever is smaller; a ``seqlen`` longer
    than the model's positions is an error.

    Returns:
        ``{"perplexity", "nll", "windows", "tokens", "seqlen", "dataset", "seconds"}``.
    """
    seqlen = resolve_eval_seqlen(model.config, seqlen)
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2 (tokens per window), got {seqlen!r}.")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise ValueError(f"max_windows must be a positive integer or None (all windows), got {max_windows!r}.")
    check_seqlen(model.config, seqlen, "The evaluation seqlen (--seqlen)")
    check_loaded(model, "Evaluation")
    ids = token_ids if token_ids is not None else eval_token_ids(
        tokenizer, dataset, split=split, text_column=text_column, config_name=config_name)
    ids = check_token_ids(ids, model, "The evaluation token ids")
    n_windows = ids.shape[1] // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"The evaluation text has {ids.shape[1]} tokens, fewer than one window of seqlen={seqlen}: "
                         f"lower --seqlen.")
    device = module_device(model.get_input_embeddings())
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    nlls = []
    try:
        for w in tqdm(range(n_windows), desc="perplexity", disable=not progress, unit="window"):
            window = ids[:, w * seqlen:(w + 1) * seqlen].to(device)
            logits = model(input_ids=window, use_cache=False).logits
            loss = F.cross_entropy(logits[0, :-1].float(), window[0, 1:].to(logits.device))
            nlls.append(loss.item())
            del logits
    finally:
        model.train(was_training)
    nll = sum(nlls) / len(nlls)
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "windows": n_windows,
        "tokens": n_windows * seqlen,
        "seqlen": seqlen,
        "dataset": dataset if isinstance(dataset, str) else f"<{type(dataset).__name__}>",
        "seconds": time.perf_counter() - start,
    }


def evaluate(model, tokenizer=None, dataset=None, *, tasks=None, limit=None, batch_size=16, num_fewshot: int = 0,
             **kwargs) -> dict:
    """Perplexity and/or zero-shot benchmarks, plus the per-layer sparsity summary of ``model``.

    Args:
        dataset: perplexity text (``"wikitext2"``, ``"c4"``, a file...); default ``"wikitext2"`` when no
            ``tasks`` are given, none otherwise.
        tasks: lm-evaluation-harness tasks / suites (``"paper-7"``, ``"piqa,arc_easy"``...), scored on the
            in-memory model from local files (:func:`hfprune.eval.zeroshot.zeroshot_evaluate`); their
            result is under ``"zeroshot"``.
        limit, batch_size, num_fewshot: for the zero-shot tasks.
        kwargs: go to :func:`perplexity` (``seqlen``, ``max_windows``, ``progress``...).

    Example:
        >>> # hfprune.evaluate(model, tokenizer, tasks="paper-7")["zeroshot"]["means"]["paper-7"]["acc"]
    """
    if tasks is not None:
        check_task_files(tasks)  # a missing file or a bad number fails before the perplexity pass
        limit, batch_size, num_fewshot = check_zeroshot_args(limit, batch_size, num_fewshot)
    result = {}
    if dataset is not None or tasks is None:
        result = perplexity(model, tokenizer, "wikitext2" if dataset is None else dataset, **kwargs)
    if tasks is not None:
        result["zeroshot"] = zeroshot_evaluate(model, tokenizer, tasks, limit=limit, batch_size=batch_size,
                                               num_fewshot=num_fewshot)
    layers = layer_sparsity_report(model)
    zeros = sum(v["zeros"] for k, v in layers.items() if not k.endswith("lm_head"))
    numel = sum(v["numel"] for k, v in layers.items() if not k.endswith("lm_head"))
    result["linear_sparsity"] = zeros / max(1, numel)
    result["layers"] = {k: round(v["sparsity"], 6) for k, v in layers.items()}
    return result
