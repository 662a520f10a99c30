"""Tests for hfprune.training: sparse fine-tuning, LoRA merge, distillation, gradual pruning."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, Trainer,
                          TrainingArguments)
from transformers.pytorch_utils import Conv1D

from hfprune.solvers.masks import check_nm, select_mask
from hfprune.training import (DistillationTrainer, GradualPruner, GradualPruningCallback, MaskPreservingCallback,
                              canonical_name, cubic_sparsity, distillation_loss, masks_from_zeros,
                              merge_lora_keep_sparsity, sparsity_report)

VOCAB = 256


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def sparse_llama(seed: int = 0, sparsity: float = 0.5) -> LlamaForCausalLM:
    """Tiny Llama whose decoder Linear layers are 50% pruned (per-row magnitude, hfprune.solvers.masks)."""
    model = tiny_llama(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and "lm_head" not in name:
                module.weight[select_mask(module.weight.abs(), sparsity, "unstructured", "row")] = 0
    return model


def lm_dataset(n: int = 16, seq: int = 16, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def train_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, learning_rate=1e-2, weight_decay=0.1, optim="adamw_torch",
                  use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                  dataloader_num_workers=0, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# ---------------------------------------------------------------------------------------------
# (a) MaskPreservingCallback with Trainer
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bf16", [False, True])
def test_mask_preserving_trainer_keeps_zeros(tmp_path, bf16):
    model = sparse_llama()
    masks = masks_from_zeros(model)
    assert len(masks) == 14  # 7 Linear per block x 2 blocks; lm_head has no zeros
    for mask in masks.values():
        assert math.isclose(mask.float().mean().item(), 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    callback = MaskPreservingCallback()  # masks taken from the zeros at train begin
    trainer = Trainer(model=model, args=train_args(tmp_path, bf16=bf16), train_dataset=lm_dataset(),
                      callbacks=[callback])
    trainer.train()
    assert trainer.state.global_step == 5
    assert callback.num_masked == 14

    params = dict(model.named_parameters())
    for name, mask in masks.items():
        weight = params[name].detach()
        assert torch.count_nonzero(weight[mask]) == 0, name  # exactly zero, not just small
        assert not torch.equal(weight[~mask], before[name][~mask]), name  # live weights trained
    # the pruned weights really were under pressure: AdamW's weight decay and dense gradients
    assert not torch.equal(params["lm_head.weight"], before["lm_head.weight"])


def test_without_callback_sparsity_is_lost(tmp_path):
    """Control for (a): the same training without the callback fills the pruned positions."""
    model = sparse_llama()
    masks = masks_from_zeros(model)
    Trainer(model=model, args=train_args(tmp_path, max_steps=1), train_dataset=lm_dataset()).train()
    params = dict(model.named_parameters())
    assert all(torch.count_nonzero(params[n][m]) > 0 for n, m in masks.items())


def test_mask_preserving_given_masks_and_plain_loop():
    model = sparse_llama()
    masks = masks_from_zeros(model, include=[r"mlp\."])
    assert masks and all(".mlp." in n for n in masks)
    cb = MaskPreservingCallback(masks=masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    cb.attach(model, opt)
    ids = torch.randint(0, VOCAB, (2, 8))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        for name, mask in masks.items():  # gradient hook masked the gradient
            assert torch.count_nonzero(dict(model.named_parameters())[name].grad[mask]) == 0
        opt.step()
        opt.zero_grad()
        cb.apply()
    cb.detach()
    params = dict(model.named_parameters())
    assert all(torch.count_nonzero(params[n][m]) == 0 for n, m in masks.items())

    with pytest.raises(KeyError):
        MaskPreservingCallback(masks={"nope.weight": torch.zeros(2, 2, dtype=torch.bool)}).attach(model)


def test_canonical_name_and_sparsity_report():
    assert canonical_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert canonical_name("module._orig_mod.score.modules_to_save.default.weight") == "score.weight"
    assert canonical_name("base_layer_norm.weight") == "base_layer_norm.weight"

    model = nn.Sequential(nn.Linear(4, 4), Conv1D(6, 4), nn.Conv2d(2, 2, 3))
    with torch.no_grad():
        model[0].weight[0] = 0
        model[1].weight[:, :3] = 0
    masks = masks_from_zeros(model)
    assert set(masks) == {"0.weight", "1.weight"}
    report = sparsity_report(model)
    assert report["layers"]["0.weight"]["zeros"] == 4
    assert report["layers"]["1.weight"]["sparsity"] == 0.5
    assert report["zeros"] == 16 and report["numel"] == 16 + 24 + 36


# ---------------------------------------------------------------------------------------------
# (b) LoRA: train, then merge keeping sparsity
# ---------------------------------------------------------------------------------------------

def test_lora_merge_keeps_sparsity(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    model = sparse_llama()
    base_masks = masks_from_zeros(model)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    peft_model = peft.get_peft_model(model, config)
    callback = MaskPreservingCallback(masks=base_masks)  # plain names, mapped onto base_layer.weight
    Trainer(model=peft_model, args=train_args(tmp_path, max_steps=3), train_dataset=lm_dataset(),
            callbacks=[callback]).train()
    assert callback.num_masked == len(base_masks)
    peft_model.eval()

    # Reference, computed independently: base weight + (keep * delta), adapters disabled.
    ref = copy.deepcopy(peft_model)
    n_lora = 0
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, LoraLayer):
                delta = module.get_delta_weight("default")
                assert torch.count_nonzero(delta) > 0  # adapters trained
                keep = ~base_masks[canonical_name(f"{name}.weight")]
                weight = module.get_base_layer().weight
                weight.copy_(weight + keep * delta)
                n_lora += 1
    assert n_lora == 14
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), ref.disable_adapter():
        expected = ref(input_ids=ids).logits
    with torch.no_grad():
        adapter_logits = peft_model(input_ids=ids).logits

    # The bug we avoid: peft's own merge writes the dense delta into the pruned positions.
    naive = copy.deepcopy(peft_model).merge_and_unload()
    naive_params = dict(naive.named_parameters())
    assert all(torch.count_nonzero(naive_params[n][m]) > 0 for n, m in base_masks.items())

    merged = merge_lora_keep_sparsity(peft_model)
    assert isinstance(merged, LlamaForCausalLM)
    params = dict(merged.named_parameters())
    for name, mask in base_masks.items():
        assert torch.count_nonzero(params[name][mask]) == 0, name
        assert math.isclose(sparsity_report(merged)["layers"][name]["sparsity"], 0.5)
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapter_logits, expected, atol=1e-5)  # the masking changed the function


# ---------------------------------------------------------------------------------------------
# (c) cubic schedule
# ---------------------------------------------------------------------------------------------

def test_cubic_sparsity_values():
    f = lambda t: cubic_sparsity(t, 0.0, 0.8, 10, 110)  # noqa: E731
    assert f(0) == 0.0 and f(10) == 0.0
    assert math.isclose(f(60), 0.8 - 0.8 * 0.5 ** 3)  # 0.7
    assert math.isclose(f(35), 0.8 - 0.8 * 0.75 ** 3)
    assert f(110) == 0.8 and f(500) == 0.8
    values = [f(t) for t in range(0, 120)]
    assert all(a <= b for a, b in zip(values, values[1:]))  # non-decreasing
    assert math.isclose(cubic_sparsity(5, 0.2, 0.6, 0, 10), 0.6 - 0.4 * 0.5 ** 3)
    assert cubic_sparsity(3, 0.1, 0.5, 3, 3) == 0.5
    with pytest.raises(ValueError):
        cubic_sparsity(0, 0.0, 1.5, 0, 10)
    with pytest.raises(ValueError):
        cubic_sparsity(0, 0.0, 0.5, 10, 5)


# ---------------------------------------------------------------------------------------------
# (d) GradualPruningCallback on a tiny BERT classifier
# ---------------------------------------------------------------------------------------------

def cls_dataset(n: int = 32, seq: int = 12, seed: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, seq), generator=g)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": int(row[0] % 2)} for row in ids]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gradual_pruning_callback_bert(tmp_path, scope):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(cfg)
    callback = GradualPruningCallback(final_sparsity=0.6, start_step=0, end_step=6, frequency=2, scope=scope)
    trainer = Trainer(model=model, args=train_args(tmp_path, max_steps=10, learning_rate=1e-3,
                                                   gradient_accumulation_steps=1),
                      train_dataset=cls_dataset(), callbacks=[callback])
    trainer.train()
    pruner = callback.pruner
    assert pruner.last_prune_step == 6
    assert len(pruner.targets) == 2 * 6 + 2  # q k v o up down per layer + pooler + classifier
    if scope == "layer":
        for name, value in pruner.layer_sparsity().items():
            numel = pruner.targets[name].weight.numel()
            assert abs(value - 0.6) <= 1.0 / numel + 1e-12, (name, value)
    else:
        total = sum(t.weight.numel() for t in pruner.targets.values())
        assert abs(pruner.sparsity() - 0.6) <= 1.0 / total + 1e-12
    for name, mask in pruner.masks.items():  # zeros are exactly the masks after more training
        assert torch.equal(pruner.targets[name].weight == 0, mask)


# ---------------------------------------------------------------------------------------------
# (e) GradualPruner in a plain torch loop, CNN
# ---------------------------------------------------------------------------------------------

class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)  # rows of 4*3*3 = 36 inputs (multiple of 4)
        self.fc = nn.Linear(8 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("pattern,score,scope,final", [
    ("2:4", "magnitude", "layer", 0.5),
    ("unstructured", "magnitude", "global", 0.8),
    ("unstructured", "movement", "layer", 0.7),
    ("unstructured", "taylor", "row", 0.7),
    ("rows", "magnitude", "layer", 0.5),
])
def test_gradual_pruner_cnn(pattern, score, scope, final):
    torch.manual_seed(0)
    x = torch.randn(256, 4, 8, 8)
    y = (x.flatten(1) @ torch.randn(256, 3)).argmax(1)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    pruner = GradualPruner(model, final, start_step=10, end_step=50, frequency=10, pattern=pattern, score=score,
                           scope=scope, optimizer=opt)
    assert set(pruner.targets) == {"conv", "fc"}
    losses, snapshots = [], []
    for step in range(80):
        idx = torch.randint(0, 256, (64,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if pruner.step(step + 1):
            snapshots.append({n: m.clone() for n, m in pruner.masks.items()})
        losses.append(loss.item())
    pruner.remove_hooks()

    assert len(snapshots) == 5  # steps 10, 20, 30, 40, 50
    for old, new in zip(snapshots, snapshots[1:]):  # monotone masks
        assert all(torch.equal(old[n] & new[n], old[n]) for n in old)
    for name, target in pruner.targets.items():
        assert torch.equal(target.weight == 0, pruner.masks[name])
    if pattern == "2:4":
        assert check_nm(model.conv.weight.reshape(8, -1), 2, 4) and check_nm(model.fc.weight, 2, 4)
        assert torch.equal(snapshots[0]["conv"], snapshots[-1]["conv"])  # final pattern from the start
    elif pattern == "rows":
        assert (model.conv.weight.reshape(8, -1) == 0).all(1).sum() == 4  # whole output channels
        assert (model.conv.bias == 0).sum() == 4
        assert (model.fc.weight == 0).all(1).sum() == 2  # round(0.5 * 3)
    elif scope == "global":
        total = sum(t.weight.numel() for t in pruner.targets.values())
        assert abs(pruner.sparsity() - final) <= 1.0 / total
    else:
        for name, value in pruner.layer_sparsity().items():
            assert abs(value - final) <= 1.0 / pruner.targets[name].weight.numel()
    # still learning under pruning
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_gradual_pruner_options():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Conv2d(3, 4, 3))
    pruner = GradualPruner(model, 0.5, end_step=0, frequency=1, pattern="4:8", exclude=[r"^1$"])
    assert set(pruner.targets) == {"0"} and pruner.skipped == ["2"]  # 27 inputs: not a multiple of 8
    assert pruner.step(0) and check_nm(model[0].weight, 4, 8)
    with pytest.raises(ValueError):
        GradualPruner(model, 0.5, pattern="rows", scope="row")
    with pytest.raises(ValueError):
        GradualPruner(model, 0.5, score="random")


# ---------------------------------------------------------------------------------------------
# (f) distillation
# ---------------------------------------------------------------------------------------------

def test_distillation_loss_zero_for_identical_teacher(tmp_path):
    student = tiny_llama()
    teacher = copy.deepcopy(student)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        logits = student(input_ids=ids).logits
    assert distillation_loss(logits, logits.clone(), temperature=1.0).item() < 1e-6
    assert distillation_loss(logits, torch.randn_like(logits), temperature=1.0).item() > 0.1

    trainer = DistillationTrainer(model=student, teacher_model=teacher, temperature=1.0, alpha=1.0,
                                  args=train_args(tmp_path), train_dataset=lm_dataset())
    assert trainer.shift_labels
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        kl_only = trainer.compute_loss(student, inputs)
        trainer.alpha = 0.0
        lm_only = trainer.compute_loss(student, inputs)
        trainer.alpha = 0.5
        mixed = trainer.compute_loss(student, inputs)
        reference = student(**inputs).loss
    assert abs(kl_only.item()) < 1e-6
    torch.testing.assert_close(lm_only, reference)
    torch.testing.assert_close(mixed, 0.5 * reference, atol=1e-6, rtol=1e-5)


def test_distillation_trainer_trains_sparse_student(tmp_path):
    teacher = tiny_llama()
    student = sparse_llama()
    masks = masks_from_zeros(student)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, temperature=2.0, alpha=0.5,
                                  args=train_args(tmp_path, max_steps=3), train_dataset=lm_dataset(),
                                  callbacks=[MaskPreservingCallback()])
    ids = torch.randint(0, VOCAB, (2, 10))
    inputs = {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        before = trainer.compute_loss(student, inputs).item()
    trainer.train()
    params = dict(student.named_parameters())
    assert all(torch.count_nonzero(params[n][m]) == 0 for n, m in masks.items())
    with torch.no_grad():
        after = trainer.compute_loss(student, inputs).item()
    assert math.isfinite(after) and before > 0
