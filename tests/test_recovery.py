"""Tests for hfprune.workflows.recovery: recovery fine-tuning keeps the pruned zeros (full, LoRA, distill),
time budget, CLI round trip and output-folder safety. Tiny models only."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from conftest import VOCAB, tiny_model

import hfprune
from hfprune.cli.recover import add_cli
from hfprune.workflows.recovery import RecoveryArguments, arguments_from, recover, token_windows
from hfprune.training import masks_from_zeros

WORDS = ("pruning sparse weights model quick brown fox jumps over lazy dog calibration data text small "
         "network faster smaller activations measure sample neural removes").split()


def _lines(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n, 12), generator=g)
    return [" ".join(WORDS[i] for i in row) + "." for row in idx.tolist()]


@pytest.fixture
def text_files(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("\n".join(_lines(60, 1)) + "\n", encoding="utf-8")
    evalf = tmp_path / "eval.txt"
    evalf.write_text("\n".join(_lines(20, 2)) + "\n", encoding="utf-8")
    return train, evalf


def pruned_llama():
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    hfprune.prune(model, None, hfprune.WandaConfig(pattern="2:4"), calibration=ids, progress=False)
    return model


def small_args(text_files, **kw) -> RecoveryArguments:
    train, evalf = text_files
    base = dict(dataset=str(train), eval_dataset=str(evalf), seqlen=16, max_steps=3, learning_rate=1e-3,
                per_device_train_batch_size=2, warmup_steps=0, lr_scheduler_type="constant", eval_seqlen=32,
                eval_max_windows=2, logging_steps=1, weight_decay=0.1)
    base.update(kw)
    return RecoveryArguments(**base)


def assert_zeros_kept(model, masks):
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.count_nonzero(params[name].detach()[mask]) == 0, name


def test_full_finetune_keeps_zeros_and_trains(text_files, tiny_tokenizer):
    model = pruned_llama()
    masks = masks_from_zeros(model, include=[r"layers\."])
    assert len(masks) == 14
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = recover(model, tiny_tokenizer, small_args(text_files, eval_steps=2))
    assert result["steps"] == 3 and not result["stopped_by_time"]
    assert result["sparsity_before"] == result["sparsity_after"] == pytest.approx(0.5)
    assert result["zeros_before"] == result["zeros_after"]
    assert [e["step"] for e in result["evals"]] == [0, 2, 3]
    assert [entry["step"] for entry in result["losses"]] == [1, 2, 3]
    assert_zeros_kept(model, masks)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert not torch.equal(params[name][~mask], before[name][~mask]), name
    json.dumps(result)  # JSON-ready


def test_lora_merge_keeps_zeros(text_files, tiny_tokenizer):
    pytest.importorskip("peft")
    model = pruned_llama()
    masks = masks_from_zeros(model, include=[r"layers\."])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = recover(model, tiny_tokenizer, small_args(text_files, lora=True, lora_r=4, lora_dropout=0.0,
                                                      learning_rate=1e-2, eval_dataset="none"))
    assert result["merged"] and result["evals"] == []
    assert result["sparsity_after"] == result["sparsity_before"]
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged in place, adapters gone
    assert_zeros_kept(model, masks)
    params = dict(model.named_parameters())
    changed = sum(not torch.equal(params[n], before[n]) for n in masks)
    assert changed == len(masks)  # every adapted layer got its (masked) delta


def test_distill_keeps_zeros(text_files, tiny_tokenizer):
    dense = tiny_model("llama")
    model = pruned_llama()
    masks = masks_from_zeros(model, include=[r"layers\."])
    with pytest.raises(ValueError, match="teacher"):
        recover(model, tiny_tokenizer, small_args(text_files, distill=True))
    result = recover(model, tiny_tokenizer, small_args(text_files, distill=True, max_steps=2, eval_dataset="none"),
                     teacher=copy.deepcopy(dense))
    assert result["steps"] == 2
    assert_zeros_kept(model, masks)


def test_time_budget_stops_training(text_files, tiny_tokenizer):
    model = pruned_llama()
    result = recover(model, tiny_tokenizer, small_args(text_files, max_steps=500, max_minutes=1e-6,
                                                      eval_dataset="none"))
    assert result["stopped_by_time"] and result["steps"] == 1


def test_windows_and_argument_checks(text_files, tiny_tokenizer):
    w = token_windows(tiny_tokenizer, _lines(30, 3), 16)
    assert w.shape[1] == 16 and w.shape[0] > 2
    assert token_windows(tiny_tokenizer, _lines(30, 3), 16, max_windows=2).shape == (2, 16)
    with pytest.raises(ValueError, match="seqlen"):
        token_windows(tiny_tokenizer, ["a b"], 64)
    with pytest.raises(ValueError, match="max-steps"):
        RecoveryArguments(max_steps=0)
    with pytest.raises(ValueError, match="Unknown recipe key 'max_step'"):
        arguments_from({"max_step": 3})
    train, _ = text_files
    with pytest.raises(ValueError, match="evaluation text"):
        recover(pruned_llama(), tiny_tokenizer, small_args(text_files, eval_dataset=str(train)))
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(RecoveryArguments).parse_args_into_dataclasses(["--max_steps", "7", "--lora"])
    assert parsed.max_steps == 7 and parsed.lora and parsed.merge_lora


def _cli(argv):
    parser = argparse.ArgumentParser(prog="hfprune")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    ns = parser.parse_args(argv)
    ns.argv = argv
    return ns.func(ns)


def test_cli_round_trip_and_output_safety(tmp_path, text_files, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    train, evalf = text_files
    src = tmp_path / "pruned"
    model = pruned_llama()
    model.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    masks = masks_from_zeros(model, include=[r"layers\."])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max-steps: 9\nseqlen: 16\nlearning_rate: 0.001\neval_seqlen: 32\neval_max_windows: 1\n"
                      "warmup_steps: 0\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["recover", "--recipe", str(recipe), "--model", str(src), "--dataset", str(train), "--eval-dataset",
            str(evalf), "--max-steps", "2", "--batch-size", "2", "--gradient-accumulation-steps", "1", "--lr", "2e-3",
            "--eval-steps", "1", "--output", str(out)]
    assert _cli(argv) == 0
    report = json.loads((out / "recovery_report.json").read_text())
    assert report["steps"] == 2 and report["args"]["learning_rate"] == 2e-3 and report["args"]["seqlen"] == 16
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.recovery_config["steps"] == 2
    assert_zeros_kept(reloaded, masks)
    assert masks_from_zeros(reloaded, include=[r"layers\."]).keys() == masks.keys()
    assert (out / "tokenizer.json").is_file()

    # non-empty output without --overwrite: an error, folder untouched
    snapshot = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="--overwrite"):
        _cli(argv)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == snapshot


def _structured_student():
    from hfprune.structured import prune_structured

    student = tiny_model("llama", seed=1)   # another init than the teacher's: far from it to begin with
    report = prune_structured(student, heads_ratio=0.5, mlp_ratio=0.5)
    student.config.pruning_config = {"method": "structured-magnitude",
                                     **{k: v for k, v in report.items() if k != "blocks"}}
    return student


@pytest.mark.parametrize("hidden_weight", [0.0, 1.0])
def test_distill_a_structured_student_from_the_dense_teacher(text_files, tiny_tokenizer, hidden_weight):
    """A physically smaller student (half the heads and neurons) learns from the dense teacher's logits
    (and hidden states): its KL to the teacher on the training text falls, every weight may train, the shapes stay."""
    from hfprune.training import distillation_loss

    teacher = tiny_model("llama")
    student = _structured_student()
    shapes = {n: p.shape for n, p in student.named_parameters()}
    assert student.model.layers[0].mlp.down_proj.weight.shape[1] < teacher.model.layers[0].mlp.down_proj.weight.shape[1]
    ids = token_windows(tiny_tokenizer, text_files[0].read_text().splitlines(), 16, max_windows=8)

    def kl():
        with torch.no_grad():
            return float(distillation_loss(student.eval()(ids).logits, teacher.eval()(ids).logits))

    before = kl()
    result = recover(student, tiny_tokenizer, small_args(text_files, distill=True, alpha=1.0, max_steps=15,
                                                         learning_rate=1e-3, hidden_weight=hidden_weight,
                                                         eval_dataset="none"), teacher=teacher)
    assert result["steps"] == 15 and result["layers_checked"] == 0   # structured: no zero pattern held
    assert {n: p.shape for n, p in student.named_parameters()} == shapes
    after = kl()
    assert after < 0.8 * before


def test_hidden_state_loss_matches_blocks_by_depth():
    from hfprune.training import hidden_state_loss

    t = [torch.randn(2, 5, 8) for _ in range(5)]          # embeddings + 4 blocks
    assert float(hidden_state_loss(t, t)) == 0.0
    s = [t[0], t[2], t[4]]                                  # 2 blocks: matched with teacher blocks 2 and 4
    assert float(hidden_state_loss(s, t)) == 0.0
    off = [t[0], t[1], t[4]]
    assert float(hidden_state_loss(off, t)) > 0
    with pytest.raises(ValueError, match="same hidden size"):
        hidden_state_loss([torch.randn(2, 5, 4)] * 2, t)
    with pytest.raises(ValueError, match="--distill"):
        RecoveryArguments(hidden_weight=1.0)


def test_distill_default_teacher_from_a_local_base_names_the_fix(model_dir, calib_file, tmp_path, caplog):
    """config.json keeps no local path, so the default teacher of a model pruned from a local folder is
    not known: recover --distill says so and names --teacher, before any training."""
    from hfprune.cli import main

    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--calibration", str(calib_file), "--nsamples", "4",
                 "--seqlen", "32", "--method", "wanda", "--sparsity", "0.5", "--output", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["pruning_config"]["base_model_folder"] == "base"
    rc = main(["recover", "--model", str(out), "--distill", "--dataset", str(calib_file), "--max-steps", "1",
               "--seqlen", "32", "--eval-dataset", "none", "--output", str(tmp_path / "rec")])
    assert rc == 2
    assert "--teacher DIR" in caplog.text and "local folder named `base`" in caplog.text
    assert not (tmp_path / "rec").exists()
