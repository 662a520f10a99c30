"""Structured pruning honours ``targets`` / ``ignore``: blocks (or their attention / MLP part) left whole,
uniform and non-uniform counts over the selected blocks only, errors before calibration, CLI and recipe keys."""

from __future__ import annotations

import json

import pytest
import torch

import hfprune
from hfprune.cli.main import build_parser, main
from hfprune.recipes import build_configs
from hfprune.structured import AutoPrunedModelForCausalLM, StructuredConfig, prune_structured

from conftest import tiny_model


def _ids(n=6, length=24, seed=3):
    return torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def _widths(report):
    return [(b["heads_after"], b["neurons_after"]) for b in report.structured["blocks"]]


def test_ignored_block_stays_whole_and_the_model_reloads(tmp_path):
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3)
    ids = _ids()
    block0 = {k: v.clone() for k, v in model.model.layers[0].state_dict().items()}
    cfg = StructuredConfig(heads_ratio=0.5, mlp_ratio=0.25, ignore=[r"model\.layers\.0\..*"])
    report = hfprune.prune(model, config=cfg, calibration=ids, progress=False)
    assert _widths(report) == [(8, 128), (4, 96), (4, 96)]
    # the ignored block keeps its shapes and, with dense_targets='off', its weights: its inputs are the dense ones
    for k, v in model.model.layers[0].state_dict().items():
        assert torch.equal(v, block0[k]), k
    model.save_pretrained(tmp_path)
    again = AutoPrunedModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)
    assert StructuredConfig.from_dict(json.loads(cfg.to_json_string())) == cfg


def test_in_block_names_select_attention_or_mlp():
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2)
    cfg = StructuredConfig(heads_ratio=0.5, mlp_ratio=0.25, importance="magnitude",
                           ignore=[r"model\.layers\.0\.self_attn\.o_proj", r"model\.layers\.1\.mlp\..*"])
    report = hfprune.prune(model, config=cfg, progress=False)
    assert _widths(report) == [(8, 96), (4, 128)]
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2)
    cfg = StructuredConfig(heads_ratio=0.5, mlp_ratio=0.25, importance="magnitude",
                           targets=["self_attn.o_proj"])  # in-block name: heads of every block, no neurons
    with pytest.raises(ValueError, match="mlp_ratio is set but no block's MLP down projection"):
        hfprune.prune(model, config=cfg, progress=False)
    report = hfprune.prune(model, config=StructuredConfig(heads_ratio=0.5, importance="magnitude",
                                                          targets=["self_attn.o_proj"]), progress=False)
    assert _widths(report) == [(4, 128), (4, 128)]


def test_non_uniform_ranking_covers_only_the_selected_blocks():
    model = tiny_model("llama", num_hidden_layers=3)
    report = prune_structured(model, mlp_ratio=0.4, uniform=False, ignore=r"model\.layers\.1\..*")
    after = [b["neurons_after"] for b in report["blocks"]]
    assert after[1] == 128
    assert (128 - after[0]) + (128 - after[2]) == round(0.4 * 256)


def test_nothing_selected_is_refused_before_calibration(monkeypatch):
    from hfprune.core import engine

    model = tiny_model("llama")
    calls = []
    real = engine.get_calibration_ids

    def counting(*args, **kwargs):  # the refusal must come before any calibration work
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "get_calibration_ids", counting)
    hfprune.prune(tiny_model("llama"), config=StructuredConfig(mlp_ratio=0.25), calibration=_ids(), progress=False)
    assert calls == [1]  # the counter sees a run that calibrates
    calls.clear()
    with pytest.raises(ValueError, match="no block's MLP down projection matches.*--ignore"):
        hfprune.prune(model, config=StructuredConfig(mlp_ratio=0.25, ignore=[".*mlp.*"]), calibration=_ids(),
                      progress=False)
    assert not calls
    with pytest.raises(ValueError, match="--ignore"):
        StructuredConfig(mlp_ratio=0.25, ignore=["model.layers.(0"])
    with pytest.raises(ValueError, match="list of regexes"):
        StructuredConfig(mlp_ratio=0.25, targets=3)
    with pytest.raises(ValueError, match="set heads_ratio=0"):  # a ratio that no block can take is a mistake
        hfprune.prune(tiny_model("llama"), config=StructuredConfig(
            heads_ratio=0.5, mlp_ratio=0.25, importance="magnitude", ignore=[".*self_attn.*"]), progress=False)


def test_cli_flags_reach_the_structured_config():
    args = build_parser().parse_args(["prune", "--model", "m", "--output", "o", "--method", "obs", "--target", "mlp",
                                      "--mlp-ratio", "0.3", "--ignore", r"model\.layers\.0\..*", "mlp.down_proj"])
    cfg, _ = build_configs({}, {k: getattr(args, k) for k in args.method_keys})
    assert isinstance(cfg, StructuredConfig)
    assert cfg.ignore == [r"model\.layers\.0\..*", "mlp.down_proj"] and cfg.targets == [".*"]
    recipe, _ = build_configs({"method": "structured", "mlp_ratio": 0.3, "targets": r".*\.(1|2)\.mlp\..*"}, {})
    assert recipe.targets == [r".*\.(1|2)\.mlp\..*"]


def test_cli_prune_leaves_the_ignored_block_whole(model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    assert main(["prune", "--model", str(model_dir), "--calibration", str(calib_file), "--nsamples", "4",
                 "--seqlen", "32", "--output", str(out), "--method", "obs", "--target", "mlp", "--mlp-ratio", "0.25",
                 "--ignore", r"model\.layers\.0\..*"]) == 0
    model = AutoPrunedModelForCausalLM.from_pretrained(out)
    widths = [b.mlp.down_proj.in_features for b in model.model.layers]
    assert widths[0] > widths[1] and widths[1:] == [widths[1]] * (len(widths) - 1)
    assert model.config.pruning_config["ignore"] == [r"model\.layers\.0\..*"]
