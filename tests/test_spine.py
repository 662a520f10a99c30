"""One spine for every method: one registry and entry (config object, dict, recipe, CLI), stages
with their order checks, and the CLI combination that used to drop keys silently."""

import dataclasses
import json
import warnings

import pytest
import torch
import transformers as T
import yaml

import hfprune
from hfprune.cli import main
from hfprune.registry import METHODS
from hfprune.solvers.masks import check_nm

from conftest import VOCAB, tiny_model


def _moe(seed=0):
    return tiny_model("qwen3_moe", seed=seed)


def _llama(hidden=64, inter=128, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _ids(n=8, t=32):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(1))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_methods_lists_every_registered_method_one_line_each(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == sorted(METHODS)
    assert {"magnitude", "wanda", "sparsegpt", "admm", "structured", "depth", "hidden", "experts"} <= set(METHODS)
    assert all(len(line.split(None, 1)) == 2 for line in lines)  # a name and a description
    assert "obs" in next(line for line in lines if line.startswith("structured"))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_has_its_flags_and_dict_round_trip(name):
    """CLI flags are generated from every registered config; each config round-trips through a dict."""
    from hfprune.cli.main import build_parser

    parser = build_parser()
    prune = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("prune"))
    dests = {a.dest for a in prune._actions}
    cls = METHODS[name].config_cls
    shown = [f for f in dataclasses.fields(cls) if f.repr]
    assert {f.name for f in shown} <= dests, sorted({f.name for f in shown} - dests)


def test_experts_through_dict_recipe_and_cli(tmp_path, tiny_tokenizer):
    # dict
    model = _moe()
    report = hfprune.prune(model, None, {"method": "experts", "keep_experts": 6}, _ids(), progress=False)
    assert model.config.num_experts == 6 and report.structured["experts_after"] == 6
    # config object with the old name: the same result, and a warning that names the new key
    other = _moe()
    with pytest.warns(FutureWarning, match="keep_experts"):
        config = hfprune.ExpertPruningConfig(num_experts=6)
    hfprune.prune(other, None, config, _ids(), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    # recipe
    recipe = tmp_path / "experts.yaml"
    recipe.write_text(yaml.safe_dump({"method": "experts", "experts_ratio": 0.25, "importance": "frequency"}))
    config, _ = hfprune.load_recipe(recipe)
    assert isinstance(config, hfprune.ExpertPruningConfig) and config.experts_ratio == 0.25
    # CLI, reloaded with stock from_pretrained
    base = tmp_path / "base"
    _moe().save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    out = tmp_path / "out"
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(["Calibration data is a small sample of text used to measure activations."] * 40))
    assert main(["prune", "--model", str(base), "--method", "experts", "--keep-experts", "6", "--calibration",
                 str(text), "--nsamples", "4", "--seqlen", "16", "--output", str(out)]) == 0
    reloaded = T.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_experts == 6
    assert reloaded.config.pruning_config["method"] == "experts-reap"
    assert len(reloaded.config.pruning_config["experts_kept"]) == 2


def test_depth_and_hidden_through_dicts():
    model = tiny_model("llama")
    hfprune.prune(model, None, {"method": "depth", "keep_blocks": 1, "keep_first": 0}, _ids(), progress=False)
    assert model.config.num_hidden_layers == 1
    model = tiny_model("llama")
    hfprune.prune(model, None, {"method": "hidden", "keep_hidden": 48}, _ids(), progress=False)
    assert model.config.hidden_size == 48


def test_unknown_key_in_a_users_dict_is_refused():
    with pytest.raises(ValueError, match="Unknown key"):
        hfprune.prune(tiny_model("llama"), None, {"method": "experts", "keep_experts": 6, "typo": 1}, _ids())


def test_three_stages_width_admm_int4_saved_as_compressed_tensors(tmp_path):
    """25 % of the MLP neurons, then 2:4 with ADMM, then int4 g128 (GPTQ on SparseGPT's solver,
    keeping the 2:4 zeros): one report listing each stage, and stock from_pretrained with the
    compressed-tensors package reloads the same logits."""
    pytest.importorskip("compressed_tensors")
    model = _llama(hidden=128, inter=512)
    ids = _ids()
    stages = [hfprune.StructuredConfig(mlp_ratio=0.25), hfprune.ADMMConfig(pattern="2:4"),
              {"method": "sparsegpt", "sparsity": 0.0, "bits": 4, "group_size": 128}]
    report = hfprune.prune(model, None, stages, ids, progress=False)
    assert [s["method"] for s in report.stages] == ["structured-obs", "admm", "sparsegpt"]
    assert len(str(report).splitlines()) == 4
    for layer in model.model.layers:
        assert layer.mlp.down_proj.weight.shape == (128, 384)
        for m in (layer.mlp.down_proj, layer.self_attn.q_proj, layer.mlp.up_proj):
            assert check_nm(m.weight, 2, 4)  # the int4 stage kept the 2:4 zeros
            w = m.weight.detach()
            for row in w.view(w.shape[0], -1, 128)[:4]:  # at most 16 distinct int4 levels per group
                assert all(len(torch.unique(g)) <= 16 for g in row)
    pc = model.config.pruning_config
    assert [s["method"] for s in pc["stages"]] == ["structured-obs", "admm", "sparsegpt"]
    out = tmp_path / "q"
    hfprune.save_pretrained(model, out, format="compressed-tensors", bits=4, group_size=128, report=report)
    reloaded = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids[:2]).logits, model(ids[:2]).logits)
    saved = json.loads((out / "config.json").read_text())
    assert saved["intermediate_size"] == 384 and saved["quantization_config"]["quant_method"] == "compressed-tensors"


@pytest.mark.parametrize("stages,message", [
    # an N:M stage whose input width a structured stage made indivisible: 128 - round(0.2 * 128) = 102 neurons
    ([{"method": "structured", "mlp_ratio": 0.2, "importance": "magnitude"}, {"method": "wanda", "pattern": "2:4"}],
     "multiple of 4"),
    ([{"method": "sparsegpt", "sparsity": 0.5, "bits": 4}, {"method": "wanda", "sparsity": 0.5}], "last stage"),
    ([{"method": "wanda", "sparsity": 0.5}, {"method": "sparsegpt", "sparsity": 0.5}], "both remove weights"),
    ([{"method": "wanda", "sparsity": 0.5}, {"method": "structured", "mlp_ratio": 0.25}], "re-fits the kept weights"),
    ([{"method": "wanda", "pattern": "2:4"},
      {"method": "structured", "mlp_ratio": 0.25, "importance": "magnitude"}], "breaks the N:M groups"),
    ([{"method": "wanda", "pattern": "2:4"}, {"method": "admm", "sparsity": 0.0, "bits": 4}], "keeping the zeros"),
    ([{"method": "depth", "keep_blocks": 1, "keep_first": 0}, {"method": "experts", "keep_experts": 2}],
     "no fused MoE experts"),
])
def test_bad_stage_orders_are_refused_before_any_work(stages, message):
    model = tiny_model("llama")
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        hfprune.prune(model, None, stages, _ids(), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.num_hidden_layers == 2 and model.config.intermediate_size == 128


def test_structured_without_compensation_after_unstructured_keeps_the_zeros():
    model = tiny_model("llama")
    hfprune.prune(model, None, [{"method": "wanda", "sparsity": 0.5},
                                {"method": "structured", "mlp_ratio": 0.25, "importance": "magnitude"}],
                  _ids(), progress=False)
    for layer in model.model.layers:
        w = layer.mlp.up_proj.weight
        assert w.shape[0] == 96 and abs(float((w == 0).float().mean()) - 0.5) < 1e-6


def test_recipe_with_stages_runs_them_in_order(tmp_path):
    recipe = tmp_path / "stages.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [{"method": "depth", "keep_blocks": 1, "keep_first": 0},
                                                 {"method": "wanda", "pattern": "2:4"}],
                                      "calibration": {"nsamples": 4, "seqlen": 16}}))
    configs, calib = hfprune.load_recipe(recipe)
    assert [c.method for c in configs] == ["depth", "wanda"] and calib.nsamples == 4
    model = tiny_model("llama")
    report = hfprune.prune(model, None, configs, _ids(), progress=False)
    assert model.config.num_hidden_layers == 1 and check_nm(model.model.layers[0].mlp.down_proj.weight, 2, 4)
    assert report.pattern == "2:4" and len(report.stages) == 2
    with pytest.raises(ValueError, match="which stage"):
        hfprune.load_recipe(recipe, sparsity=0.5)
    recipe.write_text(yaml.safe_dump({"stages": [{"method": "wanda", "sparsity": 0.5}], "sparsity": 0.3}))
    with pytest.raises(ValueError, match="beside `stages:`"):
        hfprune.load_recipe(recipe)


def test_cli_structured_target_with_sparsity_keys_is_refused_with_the_fix(model_dir, calib_file, tmp_path, caplog):
    """`--target mlp --mlp-ratio 0.25 --sparsity 0.5 --pattern 2:4 --ignore 'layers\\.0\\.'` used to exit 0
    with no 2:4 zeros and block 0 pruned (the sparsity keys were dropped)."""
    out = tmp_path / "out"
    code = main(["prune", "--model", str(model_dir), "--calibration", str(calib_file), "--nsamples", "4",
                 "--seqlen", "32", "--output", str(out), "--method", "obs", "--target", "mlp", "--mlp-ratio", "0.25",
                 "--sparsity", "0.5", "--pattern", "2:4", "--ignore", r"layers\.0\."])
    assert code == 2 and not out.exists()
    assert "stages:" in caplog.text and "`pattern`" in caplog.text and "`sparsity`" in caplog.text
    assert "`ignore`" not in caplog.text  # structured pruning honours ignore (its blocks stay whole)


def test_cli_method_structured_is_the_target_form(model_dir, calib_file, tmp_path):
    outs = []
    for args in (["--method", "structured", "--mlp-ratio", "0.25", "--importance", "wanda"],
                 ["--method", "wanda", "--target", "mlp", "--mlp-ratio", "0.25"]):
        out = tmp_path / f"out{len(outs)}"
        assert main(["prune", "--model", str(model_dir), "--calibration", str(calib_file), "--nsamples", "4",
                     "--seqlen", "32", "--output", str(out), *args]) == 0
        outs.append(T.AutoModelForCausalLM.from_pretrained(out).state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_saved_pruning_config_round_trips_with_unknown_keys_warned():
    model = tiny_model("llama")
    hfprune.prune(model, None, hfprune.WandaConfig(sparsity=0.5), _ids(), progress=False)
    saved = dict(model.config.pruning_config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = hfprune.PruningConfig.from_saved(saved)
    assert config == hfprune.WandaConfig(sparsity=0.5)
    assert any("achieved_sparsity" in str(w.message) for w in caught)


@pytest.mark.parametrize("name,methods", [("stages-mlp25-admm24-int4", ["structured", "admm", "sparsegpt"]),
                                          ("stages-mlp25-int4", ["structured", "sparsegpt"])])
def test_shipped_stage_recipes_load(name, methods):
    from conftest import REPO

    configs, calib = hfprune.load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert [c.method for c in configs] == methods and calib.nsamples == 128
    assert configs[-1].bits == 4 and configs[-1].group_size == 64 and configs[-1].sparsity == 0
    assert configs[0].mlp_ratio == 0.25
