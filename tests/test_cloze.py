import argparse
import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hfprune.cli.zeroshot import add_cli
from hfprune.eval.cloze import build_cloze_task, generation_samples, score_choices, zeroshot_accuracy

from conftest import GraphRecorder, tiny_model

V = 128


class CharTokenizer:
    """One token per character (id = code point mod 128), no special tokens added."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True, **kwargs):
        return {"input_ids": [ord(c) % V for c in text]}


class FixedLM(nn.Module):
    """Next-token distribution that ignores the context: logit 5 for 'a', 0 for everything else."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(V))
        with torch.no_grad():
            self.bias[ord("a")] = 5.0
        self.config = types.SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return types.SimpleNamespace(logits=self.bias.expand(*input_ids.shape, V))


HAND_ITEMS = [
    {"prompt": "Q:", "choices": [" aa", " b"], "label": 0},          # acc right, acc_norm right
    {"prompt": "Q:", "choices": [" bbbb", " a"], "label": 0},        # both wrong
    {"prompt": "Q:", "choices": [" a", " aaaaaaaa"], "label": 1},    # acc wrong, acc_norm right
]


def test_accuracy_matches_hand_computation():
    log_z = math.log(V - 1 + math.exp(5.0))
    lp_a, lp_other = 5.0 - log_z, -log_z  # log p('a') = -0.618, log p(other) = -5.618
    result = zeroshot_accuracy(FixedLM(), CharTokenizer(), HAND_ITEMS, return_items=True, batch_size=2)
    expected_ll = [[lp_other + 2 * lp_a, 2 * lp_other], [5 * lp_other, lp_other + lp_a],
                   [lp_other + lp_a, lp_other + 8 * lp_a]]
    for item, exp in zip(result["items"], expected_ll):
        assert item["loglikelihoods"] == pytest.approx(exp, abs=1e-4)
    assert [i["pred"] for i in result["items"]] == [0, 1, 0]
    assert [i["pred_norm"] for i in result["items"]] == [0, 1, 1]
    assert result["acc"] == pytest.approx(1 / 3) and result["acc_norm"] == pytest.approx(2 / 3)
    assert result["n"] == 3 and result["metric_backend"] == "builtin"
    assert result["acc_stderr"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 2))


def test_field_mapping_callable_dataset_and_text_labels():
    import datasets

    renamed = [{"q": d["prompt"], "opts": d["choices"], "answer": d["choices"][d["label"]]} for d in HAND_ITEMS]
    by_fields = zeroshot_accuracy(FixedLM(), CharTokenizer(), renamed, prompt_field="q", choices_field="opts",
                                  label_field="answer")
    by_dict = zeroshot_accuracy(FixedLM(), CharTokenizer(), renamed,
                                mapping={"prompt": "q", "choices": "opts", "label": "answer"})
    by_callable = zeroshot_accuracy(FixedLM(), CharTokenizer(), datasets.Dataset.from_list(renamed),
                                    mapping=lambda d: (d["q"], d["opts"], d["answer"]), limit=2)
    assert by_fields["acc"] == by_dict["acc"] == pytest.approx(1 / 3)
    assert by_callable["n"] == 2 and by_callable["acc"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="prompt_field"):
        zeroshot_accuracy(FixedLM(), CharTokenizer(), renamed)
    with pytest.raises(ValueError, match="out of range"):
        zeroshot_accuracy(FixedLM(), CharTokenizer(), [{"prompt": "x", "choices": ["a", "b"], "label": 2}])


def test_evaluate_metric_is_used_when_it_loads_and_skipped_when_not(monkeypatch):
    fake = types.ModuleType("evaluate")

    class Metric:
        def compute(self, predictions, references):
            return {"accuracy": sum(p == r for p, r in zip(predictions, references)) / len(references)}

    fake.load = lambda name: Metric()
    monkeypatch.setitem(sys.modules, "evaluate", fake)
    result = zeroshot_accuracy(FixedLM(), CharTokenizer(), HAND_ITEMS, use_evaluate=True)
    assert result["metric_backend"] == "evaluate" and result["acc"] == pytest.approx(1 / 3)

    def offline(name):
        raise FileNotFoundError("Couldn't find a module script (offline)")

    fake.load = offline
    result = zeroshot_accuracy(FixedLM(), CharTokenizer(), HAND_ITEMS, use_evaluate=True)
    assert result["metric_backend"] == "builtin" and result["acc_norm"] == pytest.approx(2 / 3)


def test_batched_scores_equal_one_by_one_reference(tiny_tokenizer):
    model = tiny_model("llama")
    items = [{"prompt": "The quick brown fox", "choices": [" jumps over the lazy dog.", " is", " Pruning removes weights"],
              "label": 0},
             {"prompt": "Calibration data is ", "choices": ["a small sample", "text used to measure activations."],
              "label": 1}]
    result = zeroshot_accuracy(model, tiny_tokenizer, items, batch_size=2, return_items=True)
    for item, got in zip(items, result["items"]):
        for choice, ll in zip(item["choices"], got["loglikelihoods"]):
            ctx_text, cont_text = item["prompt"], choice
            if ctx_text.endswith(" "):  # the trailing space belongs to the continuation
                ctx_text, cont_text = ctx_text[:-1], " " + cont_text
            ctx = tiny_tokenizer(ctx_text, add_special_tokens=False)["input_ids"]
            whole = tiny_tokenizer(ctx_text + cont_text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            ref = sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))
            assert ll == pytest.approx(ref, abs=1e-4)


SOURCE = [
    " = Heading = ",
    "Alpha beta gamma delta epsilon zeta eta theta iota kappa . Lambda mu nu xi omicron pi rho sigma tau upsilon .",
    "One two three four five six seven eight nine ten eleven. Red green blue cyan magenta yellow black white grey.",
    "Short one. Monday Tuesday Wednesday Thursday Friday Saturday Sunday and then Monday again!",
]


def test_cloze_builder_is_deterministic_with_right_shapes():
    a = build_cloze_task(SOURCE, n_items=4, n_choices=3, seed=0, min_words=8)
    b = build_cloze_task(SOURCE, n_items=4, n_choices=3, seed=0, min_words=8)
    c = build_cloze_task(SOURCE, n_items=4, n_choices=3, seed=1, min_words=8)
    assert a == b and a != c
    assert len(a) == 4
    cleaned = [s.replace(" .", ".") for s in SOURCE]
    for item in a:
        assert len(item["choices"]) == 3 and len(set(item["choices"])) == 3
        assert 0 <= item["label"] < 3
        assert item["source_index"] != 0  # the heading is skipped
        sentence = item["prompt"] + item["choices"][item["label"]]
        assert sentence in cleaned[item["source_index"]]
        assert all(c.startswith(" ") for c in item["choices"])
    with pytest.raises(ValueError, match="usable sentences"):
        build_cloze_task(SOURCE, n_items=10, min_words=8)


def test_generation_samples_are_greedy_and_repeatable(tiny_tokenizer):
    model = tiny_model("llama")
    first = generation_samples(model, tiny_tokenizer, ["The quick brown", "Pruning"], max_new_tokens=3)
    again = generation_samples(model, tiny_tokenizer, ["The quick brown", "Pruning"], max_new_tokens=3)
    assert first == again and [s["prompt"] for s in first] == ["The quick brown", "Pruning"]
    assert all(isinstance(s["completion"], str) and s["completion"] for s in first)


def test_cli_zeroshot_on_a_jsonl_task(tmp_path, tiny_tokenizer, capsys):
    model_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    task = tmp_path / "task.jsonl"
    rows = [{"question": d["prompt"], "options": d["choices"], "gold": d["label"]} for d in HAND_ITEMS]
    task.write_text("\n".join(json.dumps(r) for r in rows))
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["zeroshot", "--model", str(model_dir), "--task", str(task), "--prompt-field", "question",
                              "--choices-field", "options", "--label-field", "gold", "--limit", "2", "--json"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 2 and 0.0 <= result["acc"] <= 1.0 and result["task"] == str(task)


def test_cli_cloze_task_from_a_text_file(tmp_path, tiny_tokenizer, capsys):
    model_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()
    text.write_text("\n".join(" ".join(words[i:] + words[:i]) + "." for i in range(6)))
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["zeroshot", "--model", str(model_dir), "--task", "cloze", "--source", str(text),
                              "--limit", "3", "--n-choices", "2", "--json"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "cloze" and result["source"] == str(text) and result["n"] == 3


def test_cloze_scoring_builds_no_autograd_graph(tiny_tokenizer):
    model = tiny_model("llama")
    items = [{"prompt": "The quick brown", "choices": [" fox", " dog jumps"], "label": 0}] * 3
    with GraphRecorder(model.model.layers[0]) as graph:
        zeroshot_accuracy(model, tiny_tokenizer, items, batch_size=2)
        score_choices(model, tiny_tokenizer, "Pruning", [" works", " fails"])
        generation_samples(model, tiny_tokenizer, "Pruning", max_new_tokens=2)
    assert graph.grad_modes and not any(graph.grad_modes)
    assert graph.saved_bytes == 0 and torch.is_grad_enabled()
