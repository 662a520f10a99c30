"""Structured pruning through hfprune.prune, the CLI and the recipes."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfprune
from hfprune.cli import main
from hfprune.recipes import load_recipe
from hfprune.structured import StructuredConfig

from conftest import REPO, tiny_model


def _smol_like():
    # SmolLM2's attention layout in miniature: 9 query heads in 3 KV groups.
    return tiny_model("llama", hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                      intermediate_size=96)


@pytest.mark.parametrize("importance", ["magnitude", "wanda", "fluctuation"])
def test_prune_structured_through_engine(importance, random_ids):
    model = _smol_like()
    cfg = StructuredConfig(heads_ratio=1 / 3, mlp_ratio=0.25, importance=importance, gqa_mode="whole_group")
    report = hfprune.prune(model, config=cfg, calibration=random_ids, progress=False)
    assert report.structured["params_after"] < report.structured["params_before"]
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 6
    assert model.config.intermediate_size == 72
    assert "structured" in str(report)
    with torch.no_grad():
        assert torch.isfinite(model(random_ids).logits).all()


def test_cli_structured_uniform_reloads_with_stock_transformers(tmp_path, tiny_tokenizer, random_ids):
    base = tmp_path / "base"
    _smol_like().save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    calib = tmp_path / "c.txt"
    calib.write_text("\n".join(["Some calibration text for the structured test. " * 20] * 5))
    out = tmp_path / "out"
    assert main(["prune", "--model", str(base), "--method", "wanda", "--target", "heads,mlp", "--heads-ratio", "0.3334",
                 "--mlp-ratio", "0.25", "--gqa-mode", "whole_group", "--calibration", str(calib), "--nsamples", "2",
                 "--seqlen", "32", "--output", str(out)]) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["structured"]["params_after"] < report["structured"]["params_before"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_key_value_heads == 2 and model.config.intermediate_size == 72
    assert model.config.pruning_config["method"] == "structured-wanda"
    with torch.no_grad():
        model(random_ids)


def test_structured_recipes_and_errors(tmp_path):
    cfg, calib = load_recipe(REPO / "recipes" / "structured-mlp-25.yaml")
    assert isinstance(cfg, StructuredConfig) and cfg.mlp_ratio == 0.25 and cfg.importance == "wanda"
    cfg, _ = load_recipe(REPO / "recipes" / "structured-heads-mlp.yaml")
    assert cfg.gqa_mode == "whole_group" and cfg.bias_compensation
    path = tmp_path / "r.yaml"
    path.write_text("method: wanda\ntarget: heads\n")
    with pytest.raises(ValueError, match="heads_ratio"):
        load_recipe(path)
    path.write_text("method: wanda\nmlp_ratio: 0.2\n")
    with pytest.raises(ValueError, match="target"):
        load_recipe(path)
    with pytest.raises(ValueError, match="fraction REMOVED"):
        StructuredConfig(mlp_ratio=1.0)
