"""Zero-shot multiple-choice accuracy by log-likelihood, the synthetic offline ``cloze`` task, and generation samples.

Scoring follows lm-evaluation-harness: for every choice the model scores the *continuation*
(the choice) given the *context* (the prompt); the log-likelihood of a choice is the sum of the
log-probabilities of its tokens. ``acc`` picks the choice with the highest sum; ``acc_norm``
divides each sum by the length of the choice in characters first (lm-eval's ``acc_norm``), which
removes the bias towards short choices.

Items come from a :class:`datasets.Dataset` or a list of dicts: fields ``prompt`` / ``choices`` /
``label`` by default (rename them with ``prompt_field=`` etc., or pass a callable
``mapping(doc) -> (prompt, choices, label)``). The label is the index of the right choice or
the right choice's text.

Real benchmarks (HellaSwag, ARC, PIQA, BoolQ...) run through lm-evaluation-harness itself on local
copies of their splits: :mod:`hfprune.eval.zeroshot` (``hfprune eval --tasks paper-7``); use those for
numbers comparable with papers. :func:`build_cloze_task` makes a *synthetic* multiple-choice task
from any local text (WikiText-2, C4): the prompt is the first part of a sentence, the right choice
its true ending, the distractors endings of other sentences (``hfprune zeroshot --task cloze``). It
is kept because it needs no task data and no extra package and runs in seconds, a quick
dense-vs-pruned check; it is no published benchmark, so compare its numbers only with each other
(dense vs pruned).

Example:
    >>> items = build_cloze_task(["One two three four five six seven eight nine ten.",
    ...                           "Alpha beta gamma delta epsilon zeta eta theta iota kappa."],
    ...                          n_items=2, n_choices=2, min_words=4)
    >>> sorted(items[0])
    ['choices', 'label', 'prompt', 'source_index']
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from hfprune.arch import max_positions
from hfprune.data import load_texts
from hfprune.eval.taskdata import parse_json_lines

logger = logging.getLogger(__name__)

__all__ = [
    "zeroshot_accuracy",
    "task_items",
    "score_choices",
    "build_cloze_task",
    "cloze_task",
    "load_task_file",
    "generation_samples",
]

Item = tuple[str, list[str], int]


# ----------------------------------------------------------------------------------------- items
def _label_index(label: Any, choices: list[str], where: str) -> int:
    if isinstance(label, bool) or (isinstance(label, float) and not label.is_integer()):
        kind = "a boolean" if isinstance(label, bool) else "not a whole number"
        raise ValueError(f"{where}: label {label!r} is {kind}: give the 0-based index of the right choice "
                         f"(0..{len(choices) - 1}) or its text, one of {choices} (for yes/no tasks map true/false "
                         f"to the index of the matching choice, e.g. with a mapping callable).")
    if isinstance(label, str) and not label.strip().lstrip("-").isdigit():
        if label not in choices:
            raise ValueError(f"{where}: label {label!r} is not one of the choices {choices}; give the index "
                             f"of the right choice or its exact text.")
        return choices.index(label)
    try:
        index = int(label)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: label {label!r} is neither a choice index nor a choice text.") from None
    if not 0 <= index < len(choices):
        raise ValueError(f"{where}: label {index} is out of range for {len(choices)} choices (0-based index).")
    return index


def task_items(dataset: Iterable, prompt_field: str, choices_field: str, label_field: str,
           mapping: Callable | dict | None, limit: int | None) -> list[Item]:
    """``(prompt, choices, label_index)`` for every document of ``dataset`` (the first ``limit``)."""
    if isinstance(mapping, dict):
        prompt_field = mapping.get("prompt", prompt_field)
        choices_field = mapping.get("choices", choices_field)
        label_field = mapping.get("label", label_field)
        mapping = None
    if isinstance(dataset, (str, os.PathLike)):
        raise TypeError("Pass the items (a datasets.Dataset or a list of dicts), not a path: "
                        "load a file with hfprune.eval.cloze.load_task_file(path).")
    out: list[Item] = []
    for i, doc in enumerate(dataset):
        if limit is not None and len(out) >= limit:
            break
        where = f"item {i}"
        if mapping is not None:
            prompt, choices, label = mapping(doc)
        else:
            missing = [f for f in (prompt_field, choices_field, label_field) if f not in doc]
            if missing:
                raise ValueError(f"{where} has no field(s) {missing} (fields: {sorted(doc)}); set prompt_field=, "
                                 f"choices_field=, label_field= (--prompt-field ...) or pass a mapping callable.")
            prompt, choices, label = doc[prompt_field], doc[choices_field], doc[label_field]
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: the prompt must be a string, got {type(prompt).__name__}.")
        if isinstance(choices, str) or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: choices must be a list of strings, got {choices!r}.")
        choices = list(choices)
        if len(choices) < 2:
            raise ValueError(f"{where}: a multiple-choice item needs at least 2 choices, got {len(choices)}.")
        out.append((prompt, choices, _label_index(label, choices, where)))
    if not out:
        raise ValueError("The task has no items: give at least one (and check --limit).")
    return out


# --------------------------------------------------------------------------------------- scoring
def _model_device(model) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def _prefix_ids(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before any text (BOS for Llama-style tokenizers, nothing for GPT-2 style)."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return list(ids)


def _encode_pair(tokenizer, context: str, continuation: str, prefix: list[int]) -> tuple[list[int], list[int]]:
    """Context and continuation token ids the way lm-eval makes them: trailing spaces of the
    context move to the continuation, the pair is encoded as one string and split where the
    context's own encoding ends (so word-boundary merges stay as in normal text)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    cont = whole[len(ctx):]
    ctx = list(prefix) + list(ctx)
    if not ctx:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("An empty prompt needs a BOS or EOS token to condition on: give every item a prompt.")
        ctx = [start]
    return ctx, list(cont)


@torch.no_grad()
def _loglikelihoods(model, requests: list[tuple[list[int], list[int]]], batch_size: int, max_length: int,
                    pad_id: int, progress: bool) -> list[float]:
    """Sum of log p(continuation | context) for every ``(context_ids, continuation_ids)``."""
    from tqdm.auto import tqdm

    device = _model_device(model)
    results = [0.0] * len(requests)
    # Longest first: batches of similar length waste less on padding.
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    for start in tqdm(range(0, len(order), batch_size), desc="zero-shot", disable=not progress, unit="batch"):
        chunk = order[start:start + batch_size]
        inputs, spans = [], []
        for i in chunk:
            ctx, cont = requests[i]
            full = (ctx + cont)[-(max_length + 1):]
            inp = full[:-1]
            n = min(len(cont), len(inp))
            inputs.append(inp)
            spans.append((len(inp) - n, len(inp), full[len(full) - n:]))
        width = max(len(x) for x in inputs)
        ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for r, inp in enumerate(inputs):  # right padding: causal positions before the pad are unaffected
            ids[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            mask[r, :len(inp)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for r, (i, (a, b, target)) in enumerate(zip(chunk, spans)):
            logp = F.log_softmax(logits[r, a:b].float(), dim=-1)
            tgt = torch.tensor(target, dtype=torch.long, device=logp.device)
            results[i] = float(logp.gather(-1, tgt[:, None]).sum())
        del logits
    return results


def score_choices(model, tokenizer, prompt: str, choices: Sequence[str], *, batch_size: int = 16,
                  max_length: int | None = None) -> list[float]:
    """Log-likelihood (sum of token log-probs) of every choice as the continuation of ``prompt``."""
    prefix = _prefix_ids(tokenizer)
    reqs = [_encode_pair(tokenizer, prompt, c, prefix) for c in choices]
    return _loglikelihoods(model, reqs, batch_size, max_length or _max_length(model), _pad_id(tokenizer), False)


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _max_length(model) -> int:
    return max_positions(model.config) or 2048


def _accuracy(predictions: list[int], references: list[int], use_evaluate: bool) -> tuple[float, str]:
    # `evaluate.load("accuracy")` fetches the metric script from the Hugging Face Hub: checked offline
    # (HF_HUB_OFFLINE=1, evaluate 0.4.6) it raises FileNotFoundError "Module 'accuracy' doesn't exist on the
    # Hugging Face Hub either", and `import evaluate` alone costs seconds. So by default the accuracy is
    # computed here; it is the same number the metric returns, mean(prediction == reference).
    # `use_evaluate=True` tries the metric first and falls back to this when it does not load.
    if use_evaluate:
        try:
            import evaluate

            metric = evaluate.load("accuracy")
            return float(metric.compute(predictions=predictions, references=references)["accuracy"]), "evaluate"
        except Exception as err:  # offline / not cached: the Hub lookup fails with several error types
            logger.warning("evaluate.load('accuracy') failed (%s: %s); computing accuracy directly.",
                           type(err).__name__, err)
    hits = sum(int(p == r) for p, r in zip(predictions, references))
    return hits / len(references), "builtin"


def zeroshot_accuracy(model, tokenizer, dataset: Iterable, *, prompt_field: str = "prompt",
                      choices_field: str = "choices", label_field: str = "label",
                      mapping: Callable[[Any], tuple[str, Sequence[str], Any]] | dict | None = None,
                      limit: int | None = None, batch_size: int = 16, max_length: int | None = None,
                      use_evaluate: bool = False, return_items: bool = False, progress: bool = False) -> dict:
    """Zero-shot multiple-choice accuracy of ``model`` on ``dataset`` by log-likelihood.

    Args:
        dataset: a :class:`datasets.Dataset`, a list of dicts, or any iterable of documents.
        prompt_field, choices_field, label_field: the document fields (label: index or text of the
            right choice).
        mapping: a callable ``doc -> (prompt, choices, label)``, or a dict with keys
            ``prompt``/``choices``/``label`` naming the fields; wins over the ``*_field`` arguments.
        limit: score only the first ``limit`` items.
        batch_size: sequences (prompt + one choice) per forward pass.
        max_length: longest sequence fed to the model (the prompt is cut from the left); default the
            model's ``max_position_embeddings``.
        use_evaluate: compute the accuracy with ``evaluate.load("accuracy")`` (needs the Hub or a cached
            copy; falls back to the same formula computed here).
        return_items: add per-item log-likelihoods and predictions under ``"items"``.

    Returns:
        ``{"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n", "n_choices_mean", "metric_backend", "seconds"}``
        (plus ``"items"``).

    Example:
        >>> # zeroshot_accuracy(model, tok, [{"prompt": "2 + 2 =", "choices": [" 4", " 5"], "label": 0}])["acc"]
    """
    items = task_items(dataset, prompt_field, choices_field, label_field, mapping, limit)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    start = time.perf_counter()
    prefix = _prefix_ids(tokenizer)
    requests, owner = [], []
    for k, (prompt, choices, _label) in enumerate(items):
        for j, choice in enumerate(choices):
            ctx, cont = _encode_pair(tokenizer, prompt, choice, prefix)
            if not cont:
                raise ValueError(f"item {k}: choice {j} ({choice!r}) encodes to no tokens: give it some text.")
            requests.append((ctx, cont))
            owner.append((k, j))
    was_training = model.training
    model.eval()
    try:
        lls = _loglikelihoods(model, requests, batch_size, max_length or _max_length(model), _pad_id(tokenizer),
                              progress)
    finally:
        model.train(was_training)
    per_item: list[list[float]] = [[0.0] * len(c) for _p, c, _l in items]
    for (k, j), ll in zip(owner, lls):
        per_item[k][j] = ll
    preds, preds_norm, labels = [], [], []
    for (prompt, choices, label), scores in zip(items, per_item):
        norm = [s / max(1, len(c)) for s, c in zip(scores, choices)]
        preds.append(max(range(len(scores)), key=scores.__getitem__))
        preds_norm.append(max(range(len(norm)), key=norm.__getitem__))
        labels.append(label)
    acc, backend = _accuracy(preds, labels, use_evaluate)
    acc_norm, _ = _accuracy(preds_norm, labels, use_evaluate)
    n = len(items)

    def stderr(p: float) -> float:
        return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")

    result = {
        "acc": acc,
        "acc_norm": acc_norm,
        "acc_stderr": stderr(acc),
        "acc_norm_stderr": stderr(acc_norm),
        "n": n,
        "n_choices_mean": sum(len(c) for _p, c, _l in items) / n,
        "metric_backend": backend,
        "seconds": time.perf_counter() - start,
    }
    if return_items:
        result["items"] = [{"loglikelihoods": s, "pred": p, "pred_norm": q, "label": lab}
                           for s, p, q, lab in zip(per_item, preds, preds_norm, labels)]
    return result


# ------------------------------------------------------------------------------------ cloze task
_WIKITEXT_FIXES = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
                   (" : ", ": "), (" ? ", "? "), (" ! ", "! "), (" 's ", "'s "), ("( ", "("), (" )", ")"), (" n't", "n't")]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _clean(text: str) -> str:
    text = " " + text.strip() + " "
    for old, new in _WIKITEXT_FIXES:
        text = text.replace(old, new)
    text = re.sub(r" ([.,;:!?])$", r"\1", text.strip())
    return re.sub(r"\s+", " ", text).strip()


def _sentences(texts: Iterable[str], min_words: int, max_words: int) -> list[tuple[int, list[str]]]:
    seen, out = set(), []
    for t, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"build_cloze_task needs strings; text {t} is a {type(text).__name__}.")
        stripped = text.strip()
        if not stripped or (stripped.startswith("=") and stripped.endswith("=")):  # WikiText headings
            continue
        for sentence in _SENTENCE_END.split(_clean(stripped)):
            words = sentence.split()
            if not min_words <= len(words) <= max_words or sentence[-1:] not in ".!?":
                continue
            if sentence in seen:
                continue
            seen.add(sentence)
            out.append((t, words))
    return out


def build_cloze_task(texts: Iterable[str], n_items: int, n_choices: int = 4, seed: int = 0, *,
                     min_words: int = 10, max_words: int = 40, prompt_fraction: float = 0.5) -> list[dict]:
    """A **synthetic** multiple-choice cloze task made from local text (no published benchmark).

    Every text is cut into sentences (WikiText's `` @-@ `` / `` , `` spacing is undone first;
    ``= Heading =`` lines are skipped); sentences of ``min_words``..``max_words`` words are kept.
    For ``n_items`` of them, drawn with ``seed``: the prompt is the first ``prompt_fraction`` of the
    words, the right choice the rest of the sentence (with its leading space), and the
    ``n_choices - 1`` distractors are the endings of other sentences, preferably of about the same
    number of words so that length alone gives little away. The right choice's position is random.

    Returns:
        ``n_items`` dicts ``{"prompt", "choices" (n_choices strings), "label" (int), "source_index"}``
        (``source_index``: which text the sentence came from). The same arguments give the same items.
    """
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}.")
    if n_choices < 2:
        raise ValueError(f"n_choices must be >= 2, got {n_choices}.")
    if not 0.0 < prompt_fraction < 1.0:
        raise ValueError(f"prompt_fraction must be in (0, 1), got {prompt_fraction}.")
    if min_words < 2 or max_words < min_words:
        raise ValueError(f"Need 2 <= min_words <= max_words, got {min_words}, {max_words}.")
    if isinstance(texts, str):
        texts = [texts]
    sentences = _sentences(texts, min_words, max_words)
    splits = []
    for source, words in sentences:
        cut = min(len(words) - 1, max(1, round(prompt_fraction * len(words))))
        splits.append((source, " ".join(words[:cut]), " " + " ".join(words[cut:]), len(words) - cut))
    if len(splits) < max(n_items, n_choices):
        raise ValueError(
            f"The text holds {len(splits)} usable sentences ({min_words}..{max_words} words), but {n_items} items with "
            f"{n_choices} choices need at least {max(n_items, n_choices)}: lower n_items / n_choices or give more text."
        )
    rng = random.Random(seed)
    chosen = rng.sample(range(len(splits)), n_items)
    by_length: dict[int, list[int]] = {}
    for i, (_s, _p, _c, n_words) in enumerate(splits):
        by_length.setdefault(n_words, []).append(i)
    items = []
    for i in chosen:
        source, prompt, truth, n_words = splits[i]
        distractors: list[str] = []
        for width in range(0, max_words + 1):  # widen the length window until there are enough endings
            pool = sorted({j for d in {-width, width} for j in by_length.get(n_words + d, [])} - {i})
            pool = [j for j in pool if splits[j][2] != truth and splits[j][2] not in distractors]
            rng.shuffle(pool)
            for j in pool:
                if splits[j][2] not in distractors:
                    distractors.append(splits[j][2])
                if len(distractors) == n_choices - 1:
                    break
            if len(distractors) == n_choices - 1:
                break
        if len(distractors) < n_choices - 1:
            raise ValueError(f"Found only {len(distractors)} distinct distractor endings: lower n_choices or give more text.")
        label = rng.randrange(n_choices)
        choices = distractors[:label] + [truth] + distractors[label:]
        items.append({"prompt": prompt, "choices": choices, "label": label, "source_index": source})
    return items


def cloze_task(source: str = "wikitext2", n_items: int = 500, n_choices: int = 4, seed: int = 0, **kwargs) -> list[dict]:
    """:func:`build_cloze_task` over a text source of :func:`hfprune.data.load_texts` (``"wikitext2"``:
    the WikiText-2 *test* rows, ``"c4"``: the local C4 train documents, a file, a list of strings)."""
    split = "test" if isinstance(source, str) and source.lower().startswith("wikitext") else "train"
    texts = load_texts(source, split=split)
    return build_cloze_task(texts, n_items, n_choices, seed, **kwargs)


def load_task_file(path: str | os.PathLike) -> list[dict]:
    """Items from a local ``.jsonl`` (one JSON object per line) or ``.json`` (a list of objects, or an
    object with the list under ``"data"``/``"items"``) file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Task file {path} does not exist: pass a .json/.jsonl file, or --task cloze.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}): save it as UTF-8.") from None
    if path.suffix.lower() == ".jsonl":
        docs = parse_json_lines(text.split("\n"), path)
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg}): fix the "
                             f"file.") from None
        if isinstance(data, dict):
            data = data.get("data", data.get("items"))
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a list of items (or {{'data': [...]}}).")
        docs = data
    else:
        raise ValueError(f"Cannot read {path}: use a .json or .jsonl file.")
    if not all(isinstance(d, dict) for d in docs):
        raise ValueError(f"Every item in {path} must be a JSON object.")
    return docs


# ------------------------------------------------------------------------------------ generation
@torch.no_grad()
def generation_samples(model, tokenizer, prompts: Sequence[str] | str, max_new_tokens: int = 32, *,
                       do_sample: bool = False, seed: int = 0) -> list[dict]:
    """Greedy (or seeded sampled) completions of ``prompts``, one at a time, for a quick look.

    Returns ``[{"prompt", "completion"}]``; the completion excludes the prompt.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    device = _model_device(model)
    pad = _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    out = []
    state = torch.random.get_rng_state()
    try:
        for prompt in prompts:
            torch.manual_seed(seed)
            enc = tokenizer(prompt, return_tensors="pt")
            ids = enc["input_ids"].to(device)
            mask = enc.get("attention_mask", torch.ones_like(enc["input_ids"])).to(device)
            if ids.shape[1] == 0:
                raise ValueError("An empty prompt cannot be continued: give each prompt some text.")
            kwargs = {"do_sample": True, "top_k": 50} if do_sample else {"do_sample": False}
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, **kwargs)
            text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            out.append({"prompt": prompt, "completion": text})
    finally:
        torch.random.set_rng_state(state)
        model.train(was_training)
    return out
