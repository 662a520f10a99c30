"""Structured pruning (hfprune.structured) on tiny random models of every supported family."""

from __future__ import annotations

import copy
import json
import logging
import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
)

from hfprune.arch import get_blocks, get_spec, get_submodule, weight_matrix
from hfprune.structured import (
    AutoPrunedModelForCausalLM,
    ChannelStats,
    LayerConfigView,
    StructuredConfig,
    attach_channel_stats,
    channel_scores,
    global_removal_counts,
    prune_structured,
    select_heads,
    select_neurons,
)

VOCAB = 64
_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "llama": lambda: LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                                 num_key_value_heads=2, pad_token_id=0, **_COMMON),
    "qwen2": lambda: Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                                 num_key_value_heads=2, pad_token_id=0, **_COMMON),
    "mistral": lambda: MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2, pad_token_id=0, **_COMMON),
    "phi3": lambda: Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                               num_key_value_heads=2, pad_token_id=0, **_COMMON),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                               eos_token_id=2, pad_token_id=0),
    "opt": lambda: OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=64, pad_token_id=0, **_COMMON),
    "gpt_neox": lambda: GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, pad_token_id=0, **_COMMON),
}
GQA = {"llama", "qwen2", "mistral", "phi3"}  # 8 query heads, 2 KV heads; the others are MHA with 4 heads
HEAD_DIM_IN_CONFIG = GQA  # families whose reload can state head_dim explicitly


def make_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[arch]()), attn_implementation="eager")
    return model.eval()


def tokens(seed: int = 1, batch: int = 2, length: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(ids, attention_mask=torch.ones_like(ids)).logits


def generate(model, ids):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                              use_cache=True, pad_token_id=0)


def calibrate(model):
    stats, remove = attach_channel_stats(model)
    with torch.no_grad():
        for seed in (11, 12):
            model(tokens(seed, batch=2, length=12))
    remove()
    return stats


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def safetensors_size(path) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def block_shapes(model):
    """(query rows of attention, o input features, down input features) per block, from the modules."""
    spec = get_spec(model)
    out = []
    for block in get_blocks(model, spec):
        o = get_submodule(block, spec.o)
        down = get_submodule(block, spec.down)
        out.append((weight_matrix(o).shape[1], weight_matrix(down).shape[1]))
    return out


# ---------------------------------------------------------------------------------------------
# End to end: prune, run, generate, save, reload
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_uniform_prune_save_reload(arch, tmp_path):
    model = make_model(arch)
    ids = tokens()
    model.save_pretrained(tmp_path / "orig")
    before_params = n_params(model)
    n_heads = 8 if arch in GQA else 4
    head_dim = 8 if arch in GQA else 16

    report = prune_structured(model, heads_ratio=0.5, mlp_ratio=0.25)

    assert report["params_before"] == before_params
    assert report["params_after"] == n_params(model) < before_params
    inter = 256 * 3 // 4 if arch == "gpt2" else 72
    assert block_shapes(model) == [(n_heads // 2 * head_dim, inter)] * 2
    for b in report["blocks"]:
        assert b["heads_after"] == n_heads // 2
        assert b["kv_heads_after"] == (2 if arch in GQA else n_heads // 2)
        assert b["neurons_after"] == inter
    if arch in GQA:  # per_group: 2 of the 4 query heads of each KV group stay
        for b in report["blocks"]:
            assert [h // 4 for h in b["kept_heads"]] == [0, 0, 1, 1]

    out = logits(model, ids)
    assert out.shape == (2, 10, VOCAB) and torch.isfinite(out).all()
    gen = generate(model, ids[:, :4])
    assert gen.shape == (2, 9)

    model.save_pretrained(tmp_path / "pruned")
    assert safetensors_size(tmp_path / "pruned") < safetensors_size(tmp_path / "orig")
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    if arch in HEAD_DIM_IN_CONFIG:
        # The stock config states the new shapes: plain transformers reloads it.
        assert report["reload_with"] == "transformers"
        assert "pruned_shapes" not in saved
        assert saved["num_attention_heads"] == n_heads // 2 and saved["num_key_value_heads"] == 2
        assert saved["head_dim"] == head_dim and saved["intermediate_size"] == inter
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", attn_implementation="eager")
    else:
        # GPT-2 / OPT / GPT-NeoX derive head_dim from hidden // num_heads: per-block shapes needed.
        assert report["reload_with"] == "hfprune"
        assert "pruned_shapes" in saved
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
        reloaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "pruned", attn_implementation="eager")
    reloaded.eval()
    assert n_params(reloaded) == n_params(model)
    torch.testing.assert_close(logits(reloaded, ids), out, rtol=0, atol=1e-6)
    assert torch.equal(generate(reloaded, ids[:, :4]), gen)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_nonuniform_activation_aware_save_reload(arch, tmp_path):
    model = make_model(arch)
    ids = tokens()
    stats = calibrate(model)
    importance = "fluctuation" if arch in ("llama", "gpt2", "gpt_neox") else "wanda"
    report = prune_structured(model, heads_ratio=0.5, mlp_ratio=0.4, importance=importance, stats=stats,
                              uniform=False)
    n_heads = 8 if arch in GQA else 4
    heads = [b["heads_after"] for b in report["blocks"]]
    neurons = [b["neurons_after"] for b in report["blocks"]]
    total_neurons = sum(b["neurons_before"] for b in report["blocks"])
    assert total_neurons - sum(neurons) == round(0.4 * total_neurons)
    assert sum(heads) == n_heads  # half of all heads (units) across the 2 blocks
    assert all(h >= (2 if arch in GQA else 1) for h in heads) and all(n >= 1 for n in neurons)
    if arch in GQA:
        assert all(h % 2 == 0 for h in heads)  # the same number from each of the 2 KV groups
        assert all(b["kv_heads_after"] == 2 for b in report["blocks"])
    assert report["params_after"] < report["params_before"]

    out = logits(model, ids)
    gen = generate(model, ids[:, :4])
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    if report["reload_with"] == "hfprune":
        layers = saved["pruned_shapes"]["layers"]
        assert [entry["intermediate_size"] for entry in layers] == neurons
        assert [entry["num_attention_heads"] for entry in layers] == heads
    reloaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert block_shapes(reloaded) == block_shapes(model)
    torch.testing.assert_close(logits(reloaded, ids), out, rtol=0, atol=1e-6)
    assert torch.equal(generate(reloaded, ids[:, :4]), gen)


def test_nonuniform_phi3_reads_per_block_config(tmp_path):
    """Phi-3 reads config.num_attention_heads at forward time: blocks get a LayerConfigView."""
    model = make_model("phi3")
    blocks = get_blocks(model)
    with torch.no_grad():
        for i, block in enumerate(blocks):
            q = weight_matrix(block.self_attn.qkv_proj)[:64].view(8, 8, 64)
            o = weight_matrix(block.self_attn.o_proj).view(64, 8, 8)
            for h in range(8):
                # block 0: all heads equally important; block 1: heads 0, 1, 4, 5 nearly dead
                scale = 1e-3 if i == 1 and h % 4 < 2 else 1.0
                q[h] *= scale / q[h].norm()
                o[:, h] *= scale / o[:, h].norm()
    report = prune_structured(model, heads_ratio=0.25, uniform=False)
    assert [b["heads_after"] for b in report["blocks"]] == [8, 4]
    assert report["reload_with"] == "hfprune"
    attn = blocks[1].self_attn
    assert isinstance(attn.config, LayerConfigView)
    assert attn.config.num_attention_heads == 4 and model.config.num_attention_heads == 8
    assert attn.config._attn_implementation == model.config._attn_implementation
    out = logits(model, tokens())
    model.save_pretrained(tmp_path)
    reloaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(logits(reloaded, tokens()), out, rtol=0, atol=1e-6)
    assert isinstance(copy.deepcopy(reloaded).model.layers[1].self_attn.config, LayerConfigView)


# ---------------------------------------------------------------------------------------------
# Correctness of the slicing: removing dead heads / neurons must not change the logits
# ---------------------------------------------------------------------------------------------


def _zero_head(block, spec, head: int, kv_head: int | None, n_heads: int, n_kv: int, hd: int):
    """Zero a query head's rows and o columns (and, for MHA, its key/value rows)."""
    rows = torch.arange(head * hd, (head + 1) * hd)
    weight_matrix(get_submodule(block, spec.o))[:, rows] = 0
    qkv = get_submodule(block, spec.qkv)
    parts = {"q": (head, n_heads)} if kv_head is None else {"q": (head, n_heads), "k": (kv_head, n_kv),
                                                            "v": (kv_head, n_kv)}
    for part, (h, _) in parts.items():
        if qkv is not None:
            if spec.qkv_layout == "per_head":
                start = h * 3 * hd + "qkv".index(part) * hd
            else:
                start = {"q": 0, "k": n_heads * hd, "v": (n_heads + n_kv) * hd}[part] + h * hd
            weight_matrix(qkv)[start:start + hd] = 0
        else:
            weight_matrix(get_submodule(block, getattr(spec, part)))[h * hd:(h + 1) * hd] = 0


def _zero_neurons(block, spec, neurons: list[int], inter: int):
    idx = torch.tensor(neurons)
    fused = get_submodule(block, spec.gate_up)
    if fused is not None:
        weight_matrix(fused)[torch.cat([idx, idx + inter])] = 0
    for path in (spec.gate, spec.up):
        if get_submodule(block, path) is not None:
            weight_matrix(get_submodule(block, path))[idx] = 0
    weight_matrix(get_submodule(block, spec.down))[:, idx] = 0


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_removing_dead_heads_and_neurons_keeps_logits(arch):
    model = make_model(arch)
    spec = get_spec(model)
    gqa = arch in GQA
    n_heads, n_kv, hd = (8, 2, 8) if gqa else (4, 4, 16)
    inter = 256 if arch == "gpt2" else 96
    dead_heads = {0: [1, 6], 1: [3, 4]} if gqa else {0: [2], 1: [0]}
    dead_neurons = {0: [0, 5, 17, 40, 95 if inter == 96 else 200, 3], 1: [1, 2, 50, 60, 70, 80]}
    with torch.no_grad():
        for i, block in enumerate(get_blocks(model, spec)):
            for h in dead_heads[i]:
                _zero_head(block, spec, h, None if gqa else h, n_heads, n_kv, hd)
            _zero_neurons(block, spec, dead_neurons[i], inter)
    ids = tokens()
    expected = logits(model, ids)
    report = prune_structured(model, heads_ratio=0.25, mlp_ratio=6 / inter)
    for i, b in enumerate(report["blocks"]):
        assert sorted(set(range(n_heads)) - set(b["kept_heads"])) == dead_heads[i]
        assert b["neurons_removed"] == 6
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_whole_group_removal_keeps_logits_and_reloads(tmp_path):
    model = make_model("llama")
    spec = get_spec(model)
    with torch.no_grad():
        for block in get_blocks(model, spec):  # kill KV group 1: query heads 4..7, KV head 1
            for h in range(4, 8):
                _zero_head(block, spec, h, 1, 8, 2, 8)
    ids = tokens()
    expected = logits(model, ids)
    report = prune_structured(model, heads_ratio=0.5, gqa_mode="whole_group")
    for b in report["blocks"]:
        assert b["kept_heads"] == [0, 1, 2, 3] and b["kept_kv_heads"] == [0]
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 1
    assert model.model.layers[0].self_attn.num_key_value_groups == 4
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(reloaded, ids[:, :4]), generate(model, ids[:, :4]))


def test_llama_head_count_not_dividing_hidden_falls_back_to_pruned_shapes(tmp_path, caplog):
    """LlamaConfig insists on hidden_size % num_attention_heads == 0 (64 % 6 != 0), even with an
    explicit head_dim: the uniform result is stored as per-block shapes instead."""
    model = make_model("llama")
    ids = tokens()
    with caplog.at_level(logging.WARNING, logger="hfprune.structured"):
        report = prune_structured(model, heads_ratio=0.25)
    assert [b["heads_after"] for b in report["blocks"]] == [6, 6]
    assert report["reload_with"] == "hfprune" and "not a multiple" in caplog.text
    assert model.config.num_attention_heads == 8 and model.config.head_dim == 8
    out = logits(model, ids)
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # stock load refuses, loudly
        AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(logits(reloaded, ids), out, rtol=0, atol=1e-6)


def test_zero_ratios_change_nothing():
    model = make_model("llama")
    ids = tokens()
    expected = logits(model, ids)
    config_before = model.config.to_dict()
    report = prune_structured(model, heads_ratio=0.0, mlp_ratio=0.0)
    assert report["params_after"] == report["params_before"]
    assert all(b["neurons_removed"] == 0 and b["heads_after"] == 8 for b in report["blocks"])
    assert torch.equal(logits(model, ids), expected)
    assert model.config.to_dict() == config_before


# ---------------------------------------------------------------------------------------------
# Bias compensation
# ---------------------------------------------------------------------------------------------


def test_bias_compensation_llama_creates_biases_and_reloads(tmp_path):
    model = make_model("llama")
    stats = calibrate(model)
    down0 = weight_matrix(model.model.layers[0].mlp.down_proj).clone()
    report = prune_structured(model, heads_ratio=0.5, mlp_ratio=0.25, importance="wanda", stats=stats,
                              bias_compensation=True)
    assert report["bias_compensation"] == {"attention": True, "mlp": True}
    assert report["reload_with"] == "transformers"
    assert model.config.attention_bias is True and model.config.mlp_bias is True
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.bias is not None and layer.mlp.gate_proj.bias is not None
    # down bias == W[:, removed] @ mean(x[removed])
    removed = sorted(set(range(96)) - set(_kept_neurons(down0, weight_matrix(layer.mlp.down_proj))))
    assert len(removed) == 24
    expected = (down0[:, removed].double() @ stats[0]["down"].mean[removed]).float()
    torch.testing.assert_close(layer.mlp.down_proj.bias.data, expected)
    ids = tokens()
    out = logits(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(logits(reloaded, ids), out, rtol=0, atol=1e-6)


def _kept_neurons(full: torch.Tensor, sliced: torch.Tensor) -> list[int]:
    cols = {tuple(full[:, j].tolist()): j for j in range(full.shape[1])}
    return [cols[tuple(sliced[:, j].tolist())] for j in range(sliced.shape[1])]


def test_bias_compensation_improves_mean_output():
    """FLAP: removing low-fluctuation channels and adding their mean contribution to the bias
    tracks the unpruned model better than plain removal."""
    model = make_model("gpt2")  # Conv1D always has a bias
    stats = calibrate(model)
    ids = tokens(11, batch=2, length=12)
    full = logits(model, ids)
    plain = copy.deepcopy(model)
    prune_structured(plain, mlp_ratio=0.5, importance="fluctuation", stats=stats)
    comp = copy.deepcopy(model)
    report = prune_structured(comp, mlp_ratio=0.5, importance="fluctuation", stats=stats, bias_compensation=True)
    assert report["bias_compensation"]["mlp"] is True
    err_plain = (logits(plain, ids) - full).pow(2).mean()
    err_comp = (logits(comp, ids) - full).pow(2).mean()
    assert err_comp < err_plain


def test_bias_compensation_skipped_with_warning_without_bias_flag(caplog):
    model = make_model("mistral")
    stats = calibrate(model)
    with caplog.at_level(logging.WARNING, logger="hfprune.structured"):
        report = prune_structured(model, mlp_ratio=0.25, importance="wanda", stats=stats, bias_compensation=True)
    assert report["bias_compensation"]["mlp"] is False
    assert "bias_compensation skipped" in caplog.text
    assert model.model.layers[0].mlp.down_proj.bias is None


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"heads_ratio": 1.0}, r"\[0, 1\)"),
    ({"mlp_ratio": -0.1}, r"\[0, 1\)"),
    ({"mlp_ratio": "0.5"}, "must be a number"),
    ({"importance": "taylor2"}, "magnitude, wanda, fluctuation"),
    ({"gqa_mode": "groups"}, "per_group, whole_group"),
    ({"heads_ratio": 0.1, "num_heads": 8, "num_kv_heads": 2}, "0.25, 0.5, 0.75"),
    ({"heads_ratio": 0.2, "num_heads": 8, "num_kv_heads": 2, "gqa_mode": "whole_group"}, "use one of 0.5"),
    ({"heads_ratio": 0.25, "num_heads": 4, "num_kv_heads": 1, "gqa_mode": "whole_group"}, "single KV head"),
    ({"mlp_ratio": 0.9, "intermediate_size": 2}, "remove all"),
    ({"heads_ratio": 0.95, "num_heads": 4}, "remove all"),
])
def test_structured_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuredConfig(**kwargs)


def test_structured_config_valid_and_for_model():
    assert StructuredConfig(heads_ratio=0.3, num_heads=8, num_kv_heads=2, uniform=False).heads_ratio == 0.3
    assert StructuredConfig(heads_ratio=0.3, num_heads=12).heads_ratio == 0.3  # MHA: rounded
    cfg = StructuredConfig.for_model(make_model("llama"), heads_ratio=0.5)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size) == (8, 2, 96)
    with pytest.raises(ValueError, match="0.25, 0.5, 0.75"):
        StructuredConfig.for_model(make_model("llama"), heads_ratio=0.1)
    # a ratio between allowed values is rounded to the nearest whole unit
    assert StructuredConfig.for_model(make_model("llama"), heads_ratio=0.3).heads_ratio == 0.3


def test_prune_structured_errors():
    model = make_model("llama")
    with pytest.raises(ValueError, match="0.25, 0.5, 0.75"):
        prune_structured(model, heads_ratio=0.1)
    with pytest.raises(ValueError, match="attach_channel_stats"):
        prune_structured(model, mlp_ratio=0.5, importance="wanda")
    with pytest.raises(ValueError, match="missing"):
        prune_structured(model, mlp_ratio=0.5, importance="wanda", stats={0: {}})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune_structured(model, mlp_ratio=1.0)
    with pytest.raises(ValueError, match="at most"):
        prune_structured(model, heads_ratio=0.9, uniform=False)
    assert block_shapes(model) == [(64, 96)] * 2  # nothing happened


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def test_channel_stats_matches_torch():
    acc = ChannelStats(5)
    xs = [torch.randn(2, 7, 5) * 3 + 1, torch.randn(4, 5)]
    for x in xs:
        acc.add_batch(x)
    flat = torch.cat([x.reshape(-1, 5) for x in xs]).double()
    assert acc.count == 18
    torch.testing.assert_close(acc.mean, flat.mean(0))
    torch.testing.assert_close(acc.var, flat.var(0, unbiased=False))
    torch.testing.assert_close(acc.sq_norm, flat.pow(2).sum(0))
    with pytest.raises(ValueError, match="5 input channels"):
        acc.add_batch(torch.randn(3, 4))


def test_channel_scores_formulas():
    w = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    acc = ChannelStats(2)
    acc.add_batch(torch.tensor([[1.0, 2.0], [3.0, 2.0]]))
    torch.testing.assert_close(channel_scores(w, acc, "wanda"), torch.tensor([10.0 * 10, 4.0 * 8], dtype=torch.float64))
    torch.testing.assert_close(channel_scores(w, acc, "fluctuation"), torch.tensor([10.0 * 1, 0.0], dtype=torch.float64))


def test_select_heads_rules():
    scores = torch.tensor([5.0, 1.0, 7.0, 3.0, 0.5, 9.0, 8.0, 2.0])  # 2 groups of 4
    keep, keep_kv = select_heads(scores, 2, 1, "per_group")
    assert keep.tolist() == [0, 2, 3, 5, 6, 7] and keep_kv.tolist() == [0, 1]
    keep, keep_kv = select_heads(scores, 2, 1, "whole_group")
    assert keep.tolist() == [4, 5, 6, 7] and keep_kv.tolist() == [1]  # group sums 16 < 19.5
    keep, keep_kv = select_heads(torch.tensor([3.0, 1.0, 2.0]), 3, 2)  # MHA: heads with their KV heads
    assert keep.tolist() == [0] and keep_kv.tolist() == [0]
    assert select_neurons(torch.tensor([1.0, 0.0, 1.0, 2.0]), 2).tolist() == [2, 3]  # ties by position


def test_global_removal_counts_non_uniform():
    flat = torch.arange(8.0)                                 # evenly spread scores
    skewed = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0])
    counts = global_removal_counts([flat, skewed], 0.5, "mlp_ratio")
    assert sum(counts) == 8 and counts[0] != counts[1]
    # every block keeps its most important unit
    assert global_removal_counts([torch.arange(2.0), torch.arange(2.0)], 0.5, "x") == [1, 1]
    with pytest.raises(ValueError, match="at most 0.5"):
        global_removal_counts([torch.arange(2.0), torch.arange(2.0)], 0.75, "x")


def test_ratio_rounds_to_whole_units_and_report_says_so(caplog):
    model = make_model("llama")  # 8 query heads in 2 KV groups
    report = prune_structured(model, heads_ratio=0.3)
    assert report["blocks"][0]["heads_after"] == 6  # 0.3 of 4 per-group slices -> 1 slice = 2 heads
    assert "rounded" in caplog.text
