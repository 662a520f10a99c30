"""Depth pruning (whole blocks) and hidden-size pruning (residual channels) on tiny random models of
several families: what is removed, config consistency, finite forward, stock reload equal logits."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hfprune
from hfprune import DepthPruningConfig, HiddenPruningConfig
from hfprune.arch import get_blocks
from hfprune.arch.resize import remove_layers_from_config
from hfprune.structured.depth import angular_distance, block_influence, choose_blocks, remove_blocks
from hfprune.structured.stock import stock_mismatch

VOCAB = 96
LAYERS = 6
_BASE = dict(vocab_size=VOCAB, max_position_embeddings=128, num_hidden_layers=LAYERS, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
_ATTN = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16)

FAMILIES = {
    "llama": dict(**_ATTN),
    "qwen2": dict(**_ATTN, use_sliding_window=True, sliding_window=8, max_window_layers=3),
    "qwen3": dict(**_ATTN),
    "mistral": dict(**_ATTN, sliding_window=8),
    "gemma2": dict(**_ATTN, sliding_window=8, query_pre_attn_scalar=16),
    "gemma3_text": dict(**_ATTN, sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=16),
    "qwen3_moe": dict(**_ATTN, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=2,
                      mlp_only_layers=[4]),
    "mixtral": dict(**_ATTN, num_local_experts=4, num_experts_per_tok=2),
    "gpt2": dict(n_embd=64, n_head=4, n_positions=128),
}
HIDDEN_FAMILIES = [f for f in FAMILIES if f != "gpt2"]  # GPT-2 derives head_dim from n_embd


def make(family: str, seed: int = 0, **extra):
    kw = {**_BASE, **FAMILIES[family], **extra}
    if family == "gpt2":
        kw.pop("max_position_embeddings")
        kw["n_layer"] = kw.pop("num_hidden_layers")
    config = AutoConfig.for_model(family, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model


def ids(n=4, t=24, seed=1):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def reload_stock(model, tmp_path):
    """save_pretrained -> stock from_pretrained, with every weight accounted for."""
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return loaded.eval()


def assert_cache_consistent(model):
    """Greedy decoding with the KV cache gives the logits of the full forward (layer_idx indexes the cache)."""
    x = ids(1, 20, seed=5)
    with torch.no_grad():
        full = model(input_ids=x, use_cache=False).logits
        out = model(input_ids=x[:, :12], use_cache=True)
        steps = [out.logits[:, -1]]
        past = out.past_key_values
        for t in range(12, 20):
            out = model(input_ids=x[:, t:t + 1], cache=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 11:19], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- math


def test_block_influence_and_angular_distance_read_like_the_papers():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    same, orth = x.clone(), torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    assert block_influence(x, same).abs().max() < 1e-6
    torch.testing.assert_close(block_influence(x, orth), torch.ones(2))
    torch.testing.assert_close(angular_distance(x, orth), torch.full((2,), 0.5))
    torch.testing.assert_close(angular_distance(x, -x), torch.ones(2))


def test_choose_blocks_protects_ends_and_picks_runs():
    scores = [0.0, 0.5, 0.1, 0.3, 0.05, 0.0]
    assert choose_blocks(scores, 2, keep_first=1, keep_last=1) == [2, 4]
    assert choose_blocks(scores, 2, keep_first=0, keep_last=0) == [0, 5]
    # consecutive: scores[l] = d(x_l, x_{l+2}) for l = 0..4 of a 6-block model
    assert choose_blocks([0.2, 0.3, 0.1, 0.05, 0.0], 2, keep_first=1, keep_last=1, consecutive=True) == [3, 4]


def test_configs_validate_before_any_work():
    with pytest.raises(ValueError, match="exactly one"):
        DepthPruningConfig()
    with pytest.raises(ValueError, match="importance='random'"):  # `criterion` is the old name of `importance`
        DepthPruningConfig(num_blocks=1, criterion="random")
    with pytest.raises(ValueError, match="importance='random'"):
        DepthPruningConfig(keep_blocks=1, importance="random")
    with pytest.raises(ValueError, match="at most 4 can go"):
        DepthPruningConfig(num_blocks=5).blocks_to_remove(6)
    with pytest.raises(ValueError, match="exactly one"):
        HiddenPruningConfig(hidden_ratio=0.5, keep_hidden=8)
    with pytest.raises(ValueError, match="hidden_ratio"):
        HiddenPruningConfig(hidden_ratio=1.5)
    assert hfprune.PruningConfig.from_dict({"method": "depth", "num_blocks": 2}) == DepthPruningConfig(num_blocks=2)


def test_config_rewrite_moe_rules_and_per_layer_lists():
    config = AutoConfig.for_model("qwen3_moe", **{**_BASE, **FAMILIES["qwen3_moe"]})
    kinds = [(i not in config.mlp_only_layers) and (i + 1) % config.decoder_sparse_step == 0 for i in range(LAYERS)]
    config.layer_types = [f"t{i}" for i in range(LAYERS)]
    changes = remove_layers_from_config(config, [0, 2, 3, 4])
    assert config.num_hidden_layers == 4 and config.layer_types == ["t0", "t2", "t3", "t4"]
    assert config.decoder_sparse_step == 1 and config.mlp_only_layers == [0, 1, 3]
    assert [kinds[i] for i in (0, 2, 3, 4)] == [False, False, True, False]
    assert set(changes) >= {"num_hidden_layers", "layer_types", "decoder_sparse_step", "mlp_only_layers"}


# ---------------------------------------------------------------------------------------------- depth


@pytest.mark.parametrize("family", list(FAMILIES))
def test_depth_pruning_removes_blocks_and_reloads_stock(family, tmp_path):
    model = make(family)
    blocks_before = list(get_blocks(model))
    layer_types = list(getattr(model.config, "layer_types", None) or [])
    report = hfprune.prune(model, config=DepthPruningConfig(num_blocks=2), calibration=ids(), progress=False)
    d = report.depth
    assert d.blocks_before == LAYERS and d.blocks_after == LAYERS - 2 and len(d.removed) == 2
    assert all(1 <= i <= LAYERS - 2 for i in d.removed)  # keep_first = keep_last = 1
    assert len(d.block_influence) == LAYERS and d.scores == d.block_influence
    # the removed blocks are the lowest-influence unprotected ones
    candidates = sorted(range(1, LAYERS - 1), key=lambda i: d.block_influence[i])
    assert sorted(candidates[:2]) == d.removed
    kept = [i for i in range(LAYERS) if i not in d.removed]
    blocks = get_blocks(model)
    assert [id(b) for b in blocks] == [id(blocks_before[i]) for i in kept]
    assert model.config.num_hidden_layers == LAYERS - 2
    if layer_types:
        assert model.config.layer_types == [layer_types[i] for i in kept]
    for new, block in enumerate(blocks):
        assert all(m.layer_idx == new for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int))
    assert stock_mismatch(model) == []
    assert report.structured["params_after"] < report.structured["params_before"]
    assert model.config.pruning_config["removed_blocks"] == d.removed
    x = ids(2, 16, seed=3)
    with torch.no_grad():
        logits = model(input_ids=x).logits
    assert torch.isfinite(logits).all()
    loaded = reload_stock(model, tmp_path)
    assert loaded.config.num_hidden_layers == LAYERS - 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, logits)
    assert_cache_consistent(loaded)


def test_depth_removed_blocks_equal_a_model_built_without_them():
    """Removing blocks = the dense model's computation with those blocks skipped."""
    model = make("llama")
    x = ids(2, 16, seed=4)
    blocks = get_blocks(model)
    keep = [0, 2, 3, 5]
    hidden = model.model.embed_tokens(x)
    pos = torch.arange(x.shape[1])[None]
    emb = model.model.rotary_emb(hidden, pos)
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        for i in keep:
            hidden = blocks[i](hidden, attention_mask=mask, position_embeddings=emb, position_ids=pos)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        expected = model.lm_head(model.model.norm(hidden))
        remove_blocks(model, [1, 4])
        torch.testing.assert_close(model(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)


def test_depth_gemma3_sliding_pattern_follows_kept_blocks(tmp_path):
    model = make("gemma3_text")
    before = list(model.config.layer_types)
    assert len(set(before)) == 2
    remove_blocks(model, [1, 2])
    assert model.config.layer_types == [before[i] for i in (0, 3, 4, 5)]
    for t, block in zip(model.config.layer_types, get_blocks(model)):
        assert block.self_attn.layer_type == t and block.self_attn.is_sliding == (t == "sliding_attention")
    loaded = reload_stock(model, tmp_path)
    assert [b.self_attn.layer_type for b in get_blocks(loaded)] == model.config.layer_types
    assert_cache_consistent(loaded)


@pytest.mark.parametrize("criterion", ["angular", "perplexity"])
def test_depth_other_criteria(criterion, tmp_path):
    model = make("llama")
    report = hfprune.prune(model, config=DepthPruningConfig(num_blocks=2, criterion=criterion), calibration=ids(),
                           progress=False)
    d = report.depth
    if criterion == "angular":
        assert len(d.scores) == LAYERS - 2 + 1 and d.removed[1] == d.removed[0] + 1  # a consecutive run
        start = min((l for l in range(len(d.scores)) if 1 <= l and l + 2 <= LAYERS - 1), key=lambda l: d.scores[l])
        assert d.removed == [start, start + 1]
    else:
        assert len(d.scores) == LAYERS
        assert sorted(sorted(range(1, LAYERS - 1), key=lambda i: d.scores[i])[:2]) == d.removed
    reload_stock(model, tmp_path)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_depth_perplexity_scores_are_the_loss_without_each_block(family):
    from hfprune.structured.depth import _loss, depth_scores

    model = make(family)
    layer_types = getattr(model.config, "layer_types", None)
    x = ids()
    measured = depth_scores(model, x, DepthPruningConfig(num_blocks=1, criterion="perplexity"))
    import copy

    other = copy.deepcopy(model)
    remove_blocks(other, [2])
    assert math.isclose(_loss(other, x, 4) - measured["base_loss"], measured["loss_increase"][2], rel_tol=1e-4,
                        abs_tol=1e-6)
    assert getattr(model.config, "layer_types", None) == layer_types and model.config.num_hidden_layers == LAYERS


# ---------------------------------------------------------------------------------------------- hidden


@pytest.mark.parametrize("family", HIDDEN_FAMILIES)
def test_hidden_pruning_slices_residual_channels_and_reloads_stock(family, tmp_path):
    model = make(family)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    emb_before = model.get_input_embeddings().weight.detach().clone()
    report = hfprune.prune(model, config=HiddenPruningConfig(keep_hidden=48), calibration=ids(), progress=False)
    h = report.hidden
    assert (h.hidden_before, h.hidden_after) == (64, 48) and len(h.removed_channels) == 16
    keep = torch.tensor(sorted(set(range(64)) - set(h.removed_channels)))
    assert model.config.hidden_size == 48 and model.config.head_dim == 16
    emb = model.get_input_embeddings().weight
    assert emb.shape == (VOCAB, 48)
    if family in ("gemma2", "gemma3_text"):  # sqrt(hidden) embedding scale compensated
        torch.testing.assert_close(emb, emb_before[:, keep] * math.sqrt(64 / 48))
    else:
        torch.testing.assert_close(emb, emb_before[:, keep])
    assert (model.get_output_embeddings().weight is emb) == tied
    block = get_blocks(model)[0]
    assert block.self_attn.q_proj.weight.shape == (4 * 16, 48) and block.self_attn.o_proj.weight.shape == (48, 4 * 16)
    assert block.self_attn.q_proj.in_features == 48
    assert stock_mismatch(model) == []
    x = ids(2, 16, seed=3)
    with torch.no_grad():
        logits = model(input_ids=x).logits
    assert torch.isfinite(logits).all()
    loaded = reload_stock(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, logits)
    assert_cache_consistent(loaded)


def test_hidden_activation_importance_keeps_the_loud_channels():
    model = make("llama")
    with torch.no_grad():  # channels 5 and 9 carry large activations everywhere
        model.model.embed_tokens.weight[:, [5, 9]] *= 50.0
        for norm in [m for n, m in model.named_modules() if n.endswith("norm")]:
            norm.weight[[5, 9]] = 10.0
    report = hfprune.prune(model, config=HiddenPruningConfig(keep_hidden=8), calibration=ids(), progress=False)
    kept = sorted(set(range(64)) - set(report.hidden.removed_channels))
    assert {5, 9} <= set(kept) and len(kept) == 8


def test_hidden_magnitude_is_data_free_and_tied_heads_stay_tied(tmp_path):
    model = make("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = hfprune.prune(model, config=HiddenPruningConfig(hidden_ratio=0.25, channel_importance="magnitude"),
                           calibration=None, progress=False)
    assert report.hidden.hidden_after == 48 and report.calibration is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    loaded = reload_stock(model, tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_hidden_rounds_to_what_the_config_accepts():
    """Llama demands hidden_size % num_attention_heads == 0 (head_dim explicit or not)."""
    model = make("llama")
    report = hfprune.prune(model, config=HiddenPruningConfig(keep_hidden=47, channel_importance="magnitude"),
                           calibration=None, progress=False)
    assert report.hidden.hidden_after == 44  # 47, 46, 45 are rejected by LlamaConfig (4 heads)
    model = make("llama")
    report = hfprune.prune(model, config=HiddenPruningConfig(keep_hidden=47, multiple_of=16,
                                                             channel_importance="magnitude"),
                           calibration=None, progress=False)
    assert report.hidden.hidden_after == 32


def test_hidden_refuses_families_that_derive_head_dim():
    model = make("gpt2")
    with pytest.raises(ValueError, match="head_dim"):
        hfprune.prune(model, config=HiddenPruningConfig(keep_hidden=48), calibration=ids(), progress=False)
    assert model.config.n_embd == 64


def test_width_then_depth_then_hidden_chain_reloads_stock(tmp_path):
    model = make("llama")
    hfprune.prune(model, config=hfprune.StructuredConfig(heads_ratio=0.5, mlp_ratio=0.25), calibration=ids(),
                  progress=False)  # the default importance (structured OBS) and compensation read data
    hfprune.prune(model, config=DepthPruningConfig(num_blocks=1), calibration=ids(), progress=False)
    report = hfprune.prune(model, config=HiddenPruningConfig(keep_hidden=48), calibration=ids(), progress=False)
    assert model.config.num_attention_heads == 2 and model.config.num_hidden_layers == LAYERS - 1
    assert model.config.pruning_config["method"] == "hidden"
    assert model.config.pruning_config["previous"]["method"] == "depth"
    assert report.hidden.hidden_after == 48
    x = ids(2, 16)
    with torch.no_grad():
        logits = model(input_ids=x).logits
    loaded = reload_stock(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, logits)


def test_report_json_and_save_pretrained_roundtrip(tmp_path):
    import json

    model = make("qwen2")
    report = hfprune.prune(model, config=DepthPruningConfig(depth_ratio=0.34), calibration=ids(), progress=False)
    assert report.depth.blocks_after == LAYERS - 2
    data = json.loads(report.to_json())
    assert data["depth"]["removed"] == report.depth.removed
    assert "hidden size" not in str(report) and "blocks 6 -> 4" in str(report)
    hfprune.save_pretrained(model, tmp_path / "out", report=report)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 4 and len(saved["layer_types"]) == 4
    assert saved["pruning_config"]["removed_blocks"] == report.depth.removed


# ---------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("flags, check", [
    (["--method", "depth", "--num-blocks", "2", "--criterion", "angular"],  # the old names still work
     lambda cfg: cfg["num_hidden_layers"] == LAYERS - 2 and cfg["pruning_config"]["importance"] == "angular"),
    (["--method", "depth", "--keep-blocks", str(LAYERS - 2), "--importance", "angular"],
     lambda cfg: cfg["num_hidden_layers"] == LAYERS - 2 and cfg["pruning_config"]["importance"] == "angular"),
    (["--method", "hidden", "--keep-hidden", "48"],
     lambda cfg: cfg["hidden_size"] == 48 and cfg["head_dim"] == 16),
])
def test_cli_depth_and_hidden(flags, check, tmp_path, tiny_tokenizer):
    import json

    from hfprune.cli import main

    base = tmp_path / "base"
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", **{**_BASE, **FAMILIES["llama"], "vocab_size": len(tiny_tokenizer)}))
    model.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    (tmp_path / "calib.txt").write_text("Pruning removes whole blocks and channels from a network. " * 200)
    out = tmp_path / "out"
    rc = main(["prune", "--model", str(base), "--calibration", str(tmp_path / "calib.txt"), "--nsamples", "4",
               "--seqlen", "32", "--output", str(out), *flags])
    assert rc == 0
    saved = json.loads((out / "config.json").read_text())
    assert check(saved)
    report = json.loads((out / "pruning_report.json").read_text())
    assert (report["depth"] or report["hidden"]) is not None
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_cli_help_lists_the_generated_flags(capsys):
    from hfprune.cli import main

    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    for flag in ("--keep-blocks", "--depth-ratio", "--importance", "--hidden-ratio", "--keep-hidden",
                 "--keep-experts", "--experts-ratio"):
        assert flag in text
    for old in ("--num-blocks", "--criterion", "--channel-importance"):  # deprecated: still parsed, not shown
        assert old not in text


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3_moe"])
def test_hidden_pruning_of_silent_channels_keeps_the_logits(family):
    """Channels that are zero in the residual stream everywhere (embedding columns and every writer's
    rows zero) carry nothing: removing them, with the norm correction (an RMS over 48 instead of 64
    channels), leaves the logits unchanged. Checks the surgery end to end, Gemma's sqrt(hidden)
    embedding scale and fused experts included."""
    from hfprune.structured.hidden import hidden_plan as plan_of

    model = make(family, rms_norm_eps=1e-12)  # eps would make an RMS over fewer channels not a pure ratio
    silent = list(range(48, 64))
    plan = plan_of(model, HiddenPruningConfig(keep_hidden=48))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, dims in plan.dims.items():
            p = params.get(name)
            if p is None or p.dim() < 2:
                continue
            writes = any(k in name for k in ("o_proj", "down_proj", "embed_tokens"))  # experts.down_proj too
            for d in dims:
                if writes:  # rows (or embedding columns) that write the silent channels
                    p.index_fill_(d, torch.tensor(silent), 0.0)
    x = ids(2, 16, seed=7)
    with torch.no_grad():
        dense = model(input_ids=x).logits
    report = hfprune.prune(model, config=HiddenPruningConfig(keep_hidden=48), calibration=ids(), progress=False)
    assert sorted(report.hidden.removed_channels) == silent
    assert report.hidden.norm_scale and all(math.isclose(v, math.sqrt(64 / 48), rel_tol=1e-6)
                                            for v in report.hidden.norm_scale.values())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, dense, atol=2e-4, rtol=2e-4)


def test_norm_corrections_are_rms_ratios():
    from hfprune.structured.hidden import norm_corrections

    sq = {"a": torch.tensor([4.0, 1.0, 1.0, 2.0], dtype=torch.float64)}
    r = norm_corrections(sq, torch.tensor([0, 3]))
    assert math.isclose(r["a"], math.sqrt(3.0 / 2.0))


@pytest.mark.parametrize("name, cls", [("structured-depth-8", DepthPruningConfig),
                                       ("structured-hidden-20", HiddenPruningConfig)])
def test_shipped_depth_and_hidden_recipes_load_and_round_trip(name, cls):
    from pathlib import Path

    from hfprune import load_recipe

    cfg, calib = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml")
    assert isinstance(cfg, cls) and calib.nsamples == 64 and calib.seqlen == 512 and calib.seed == 0
    assert cls.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Unknown key"):
        cls.from_dict({**cfg.to_dict(), "typo": 1})


def test_cli_depth_refuses_low_memory(tmp_path, caplog):
    from hfprune.cli import main

    rc = main(["prune", "--model", str(tmp_path / "nowhere"), "--method", "depth", "--num-blocks", "1",
               "--low-memory", "--output", str(tmp_path / "out")])
    assert rc == 2 and "--method depth" in caplog.text
    assert not (tmp_path / "out").exists()
