"""Model cards tell the truth per output kind: what is in the checkpoint, how it is stored, and how to load it
(checked by loading it the way the card says); no local path in the card or config.json."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hfprune
from hfprune.card import render_model_card

from conftest import tiny_model

LOCAL_BASE = "/home/someone/private/base-model"
ZEROS_NOTE = "Zeros buy size, not speed"
STOCK = "Stock transformers loads it; hfprune is not needed."


def _ids():
    return torch.randint(3, 96, (4, 24), generator=torch.Generator().manual_seed(1))


def _moe():
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=96, max_position_embeddings=128, num_hidden_layers=2,
                               hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


KINDS = {
    "dense": (lambda: tiny_model("llama"), hfprune.MagnitudeConfig(sparsity=0.5), {}),
    "2:4": (lambda: tiny_model("llama"), hfprune.MagnitudeConfig(sparsity=0.5, pattern="2:4"), {}),
    "sparse": (lambda: tiny_model("llama"), hfprune.MagnitudeConfig(sparsity=0.5), {"format": "sparse"}),
    "ct-int4": (lambda: tiny_model("llama"), hfprune.MagnitudeConfig(sparsity=0.5),
                {"format": "compressed-tensors", "bits": 4, "group_size": 32}),
    "uniform": (lambda: tiny_model("llama"), hfprune.StructuredConfig(heads_ratio=0.5, mlp_ratio=0.25), {}),
    "non-uniform": (lambda: tiny_model("llama"),
                    hfprune.StructuredConfig(heads_ratio=0.5, mlp_ratio=0.25, uniform=False), {}),
    "depth": (lambda: tiny_model("llama", num_hidden_layers=4), hfprune.DepthPruningConfig(num_blocks=1), {}),
    "hidden": (lambda: tiny_model("llama"), hfprune.HiddenPruningConfig(keep_hidden=48), {}),
    "experts": (_moe, hfprune.ExpertPruningConfig(num_experts=2), {}),
}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", list(KINDS))
def test_card_of_every_output_kind_tells_how_to_load_it_and_what_is_in_it(kind, tmp_path):
    build, config, save = KINDS[kind]
    model = build()
    params_before = sum(p.numel() for p in model.parameters())
    report = hfprune.prune(model, config=config, calibration=_ids(), progress=False)
    model.config._name_or_path = LOCAL_BASE  # as after from_pretrained(local folder)
    out = tmp_path / "out"
    hfprune.save_pretrained(model, out, report=report, **save)
    card = (out / "README.md").read_text()
    config_text = (out / "config.json").read_text()

    # zeros buy no speed with today's stacks; what needs a library says so
    assert "can exploit the pattern" not in card
    if kind in ("non-uniform", "ct-int4", "sparse"):
        assert "needs no extra library" not in card and "ordinary transformers checkpoint" not in card

    structured = kind in ("uniform", "non-uniform", "depth", "hidden", "experts")
    ids = torch.randint(3, 96, (1, 12))
    if structured:
        params_after = sum(p.numel() for p in model.parameters())
        assert params_after < params_before
        assert f"A smaller dense model: {params_after:,} parameters instead of {params_before:,}" in card
        assert "exact zeros" not in card and ZEROS_NOTE not in card and "| pattern |" not in card
    else:
        assert "50.00% of the weights of the pruned Linear layers are exact zeros" in card
        assert ("2:4 pattern: at most 2 non-zeros in every 4 consecutive inputs" in card) == (kind == "2:4")
        assert (ZEROS_NOTE in card) == (kind != "ct-int4")

    if kind == "non-uniform":
        assert json.loads(config_text).get("pruned_shapes"), "the global ranking gave every block the same shape"
        assert "from hfprune.structured import AutoPrunedModelForCausalLM  # pip install hfprune" in card
        assert "AutoPrunedModelForCausalLM.from_pretrained(" in card and "ignore_mismatched_sizes" in card
        assert STOCK not in card and "= AutoModelForCausalLM.from_pretrained(" not in card
        with pytest.raises(Exception):  # what the card says: stock transformers cannot build these shapes
            AutoModelForCausalLM.from_pretrained(out)
        from hfprune.structured import AutoPrunedModelForCausalLM

        loaded = AutoPrunedModelForCausalLM.from_pretrained(out).eval()
        assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    elif kind == "sparse":
        assert "import hfprune  # pip install hfprune" in card and "`hfprune-sparse` format" in card
        assert STOCK not in card and "raises an error that names hfprune" in card
    elif kind == "ct-int4":
        assert 'pip install "compressed-tensors>=0.15"' in card
        assert "int4 (symmetric, one scale per group of 32 inputs)" in card and "- int4" in card
        assert STOCK not in card and "import hfprune" not in card
    else:  # the card says stock transformers loads it: it does, with the pruned weights
        assert STOCK in card and "import hfprune" not in card and "AutoPrunedModelForCausalLM" not in card
        loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        assert torch.equal(_logits(loaded.eval(), ids), _logits(model, ids))

    # no local path anywhere, no Hub link or metadata made from one
    assert "/home/someone" not in card and "/home/someone" not in config_text
    assert "huggingface.co//" not in card and "base_model:" not in card.split("---")[1]
    assert "_name_or_path" not in json.loads(config_text)
    assert "from a local model (`base-model`)" in card and "# base-model (pruned)" in card


def test_card_shows_hub_ids_and_hides_local_paths():
    pc = {"method": "wanda", "pattern": "unstructured", "sparsity": 0.5, "achieved_sparsity": 0.5,
          "calibration": {"dataset": "/home/me/data/calib.txt", "nsamples": 8},
          "base_model": "/home/me/models/llama", "command": "hfprune prune --model /home/me/models/llama"}
    card = render_model_card(base_model="/home/me/models/llama", pruning_config=pc,
                             command="hfprune prune --model /home/me/models/llama --output=/home/me/out "
                                     "--calibration ~/data/calib.txt --method wanda")
    assert "/home/me" not in card and "~/" not in card and "huggingface.co//" not in card
    assert "base_model:" not in card and "# llama (pruned)" in card and "from a local model (`llama`)" in card
    assert "hfprune prune --model llama --output=out --calibration calib.txt --method wanda" in card
    assert '"base_model": "llama"' in card and '"dataset": "calib.txt"' in card
    hub = render_model_card(base_model="org/tiny-llama", pruning_config=pc)
    assert "base_model: org/tiny-llama" in hub and "[org/tiny-llama](https://huggingface.co/org/tiny-llama)" in hub
    assert "# org/tiny-llama (pruned)" in hub


@pytest.mark.parametrize("fmt", [["--format", "sparse"], ["--format", "compressed-tensors", "--bits", "4",
                                                          "--group-size", "32"]])
def test_cli_card_and_config_carry_no_local_path(model_dir, calib_file, tmp_path, fmt):
    from hfprune.cli import main

    out = tmp_path / "out"
    assert main(["prune", "--model", str(model_dir), "--calibration", str(calib_file), "--nsamples", "4",
                 "--seqlen", "32", "--output", str(out), "--method", "wanda", *fmt]) == 0
    card = (out / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert str(tmp_path) not in card and "huggingface.co//" not in card and "base_model:" not in card
    assert "_name_or_path" not in config
    assert "from a local model (`base`)" in card and "--model base" in card and "--calibration calib.txt" in card
    # config.json travels with the checkpoint: no local path anywhere in it (the record's command, base model,
    # calibration file), the base model's folder name only
    assert str(tmp_path) not in (out / "config.json").read_text()
    pc = config["pruning_config"]
    assert "base_model" not in pc and pc["base_model_folder"] == "base"
    assert "--model base" in pc["command"] and pc["calibration"]["dataset"] == "calib.txt"
