import json

import pytest

import hfprune
from hfprune import CalibrationConfig, MagnitudeConfig, PruningConfig, WandaConfig
from hfprune.recipes import build_configs, load_recipe

from conftest import REPO


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        WandaConfig(sparsity=sparsity)


def test_nm_sets_and_checks_sparsity():
    assert WandaConfig(pattern="2:4").sparsity == 0.5
    assert WandaConfig(pattern="1:4").sparsity == 0.75
    assert WandaConfig(pattern="2:4", sparsity=0.5).pattern == "2:4"
    with pytest.raises(ValueError, match="drop `sparsity`"):
        WandaConfig(pattern="2:4", sparsity=0.3)
    with pytest.raises(ValueError, match="1 <= N < M"):
        WandaConfig(pattern="4:4")
    with pytest.raises(ValueError, match="scope"):
        WandaConfig(pattern="2:4", scope="global")


def test_unknown_scope_and_pattern():
    with pytest.raises(ValueError, match="scope"):
        MagnitudeConfig(scope="block")
    with pytest.raises(ValueError, match="pattern"):
        MagnitudeConfig(pattern="half")


def test_json_round_trip():
    cfg = WandaConfig(sparsity=0.6, scope="layer", ignore=[".*down_proj"])
    data = json.loads(cfg.to_json_string())
    assert data["method"] == "wanda" and data["hfprune_version"] == hfprune.__version__
    again = PruningConfig.from_dict(data)
    assert isinstance(again, WandaConfig) and again == cfg


def test_from_dict_unknown_key_and_method():
    with pytest.raises(ValueError, match="sparsty"):
        PruningConfig.from_dict({"method": "wanda", "sparsty": 0.5})
    with pytest.raises(ValueError, match="Unknown pruning method 'nope'"):
        PruningConfig.from_dict({"method": "nope"})


def test_calibration_config_validation():
    with pytest.raises(ValueError, match="nsamples"):
        CalibrationConfig(nsamples=0)
    with pytest.raises(ValueError, match="Unknown calibration key"):
        CalibrationConfig.from_dict({"nsample": 3})


ONE_SHOT_RECIPES = ["magnitude-50", "wanda-50", "wanda-2of4", "wanda-4of8", "magnitude-2of4",
                    "sparsegpt-50", "sparsegpt-2of4", "sparsegpt-50-int4", "wanda-owl-70", "admm-50", "admm-2of4"]


def test_every_one_shot_recipe_is_tested():
    shipped = {p.stem for p in (REPO / "recipes").glob("*.yaml") if not p.stem.startswith(("structured", "stages"))}
    assert shipped == set(ONE_SHOT_RECIPES)


@pytest.mark.parametrize("name", ONE_SHOT_RECIPES)
def test_shipped_recipes_load(name):
    cfg, calib = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert cfg.method in hfprune.available_methods()
    assert cfg.method == name.split("-")[0]
    if "2of4" in name:
        assert cfg.pattern == "2:4" and cfg.sparsity == 0.5
    if "4of8" in name:
        assert cfg.pattern == "4:8"
    if name.endswith("-50") or name.endswith("-50-int4"):
        assert cfg.pattern == "unstructured" and cfg.sparsity == 0.5
    if "int4" in name:
        assert cfg.bits == 4 and cfg.group_size == 128
    if "owl" in name:
        assert cfg.owl and cfg.sparsity == 0.7 and cfg.owl_m == 5 and cfg.owl_lambda == 0.08
    assert calib.seed == 0
    assert type(cfg).from_dict(cfg.to_dict()) == cfg


def test_recipe_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: wanda\nsparsity: 0.5\ncalibration:\n  nsamples: 8\n  seqlen: 64\n")
    cfg, calib = load_recipe(path, sparsity=0.7)
    assert cfg.sparsity == 0.7 and calib.nsamples == 8
    cfg, calib = build_configs({"method": "wanda", "sparsity": 0.5}, {"scope": "layer", "pattern": None},
                               {"nsamples": 4})
    assert cfg.scope == "layer" and calib.nsamples == 4
    path.write_text("method: wanda\nsparsity: 0.5\nblock_sise: 3\n")
    with pytest.raises(ValueError, match="block_sise"):
        load_recipe(path)
    with pytest.raises(FileNotFoundError, match="Recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_registry_rejects_duplicates():
    from hfprune.methods.base import Pruner
    from hfprune.registry import register_pruner

    with pytest.raises(ValueError, match="already registered"):
        register_pruner("wanda", WandaConfig)(type("Dup", (Pruner,), {}))
