"""``hfprune flow``: prune -> recover (distillation) -> save -> push in one run, tiny models, fake Hub."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, tiny_model
from test_hub import fake_hub  # noqa: F401  (fixture: a local fake Hub server)

from hfprune.cli import main
from hfprune.recipes import read_recipe
from hfprune.workflows.flow import parse_flow

WORDS = "pruning sparse weights model quick brown fox jumps over lazy dog calibration data text small".split()


@pytest.fixture
def setup(tmp_path, tiny_tokenizer):
    model_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, len(WORDS), (80, 12), generator=g).tolist()
    lines = [" ".join(WORDS[i] for i in row) + "." for row in rows]
    text = tmp_path / "train.txt"
    text.write_text("\n".join(lines) + "\n")
    recipe = {
        "prune": {"method": "magnitude", "target": "heads,mlp", "heads_ratio": 0.5, "mlp_ratio": 0.5,
                  "calibration": {"dataset": str(text), "nsamples": 2, "seqlen": 16}},
        "recover": {"distill": True, "alpha": 1.0, "dataset": str(text), "eval_dataset": "none", "seqlen": 16,
                    "max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1},
        "save": {"format": "dense"},
        "push": {"repo": "alice/flow", "private": True},
    }
    return model_dir, recipe


def _write(tmp_path, recipe):
    import yaml

    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_flow_prunes_recovers_saves_and_pushes(setup, tmp_path, fake_hub):  # noqa: F811
    from transformers import AutoModelForCausalLM

    hub, _ = fake_hub
    model_dir, recipe = setup
    out = tmp_path / "out"
    argv = ["flow", "--recipe", str(_write(tmp_path, recipe)), "--model", str(model_dir), "--output", str(out)]
    assert main(argv) == 0
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(out)       # stock reload of the smaller model
    width = dense.model.layers[0].mlp.down_proj.weight.shape[1]
    assert model.model.layers[0].mlp.down_proj.weight.shape[1] == width // 2
    report = json.loads((out / "recovery_report.json").read_text())
    assert report["steps"] == 2 and report["args"]["distill"] is True
    assert model.config.recovery_config["distill"] is True
    assert model.config.pruning_config["params_after"] < model.config.pruning_config["params_before"]
    files = hub.repos["alice/flow"]["files"]
    assert "config.json" in files and "recovery_report.json" in files and hub.repos["alice/flow"]["private"]


@pytest.mark.parametrize("change,needle", [
    (lambda r: r["recover"].update(lerning_rate=1e-3), "lerning_rate"),
    (lambda r: r.update(pruning={}), "Unknown flow recipe section"),
    (lambda r: r["save"].update(format="zip"), "Unknown format"),
    (lambda r: r["recover"].update(output="x"), "recover.output"),
    (lambda r: r["prune"].pop("method"), "method"),
])
def test_bad_flow_recipes_fail_before_loading(setup, tmp_path, monkeypatch, caplog, change, needle):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the recipe was checked")

    monkeypatch.setattr("hfprune.workflows.flow.load_model", no_load)  # the name run_flow calls
    model_dir, recipe = setup
    change(recipe)
    rc = main(["flow", "--recipe", str(_write(tmp_path, recipe)), "--model", str(model_dir),
               "--output", str(tmp_path / "out")])
    assert rc == 2 and needle in caplog.text
    assert not (tmp_path / "out").exists()


def test_shipped_flow_recipe_parses():
    flow = parse_flow(read_recipe(REPO / "recipes" / "structured-flow-distill-push.yaml"))
    assert flow["recover"].distill and flow["recover"].max_minutes == 30
    assert flow["save"]["format"] == "dense" and flow["push"] is None


@pytest.mark.parametrize("where", ["recipe", "flag"])
@pytest.mark.parametrize("repo", ["../x", "alice/x--y", "no-namespace"])
def test_bad_push_repo_fails_before_loading(setup, tmp_path, monkeypatch, caplog, where, repo):
    """Issue 28: the push repo id is validated (huggingface_hub's validator) before any work, not after saving."""
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the push repo id was checked")

    monkeypatch.setattr("hfprune.load_model", no_load)
    model_dir, recipe = setup
    extra = []
    if where == "recipe":
        recipe["push"]["repo"] = repo
    else:
        extra = ["--repo", repo]
    rc = main(["flow", "--recipe", str(_write(tmp_path, recipe)), "--model", str(model_dir),
               "--output", str(tmp_path / "out"), *extra])
    assert rc == 2 and "Invalid repo id" in caplog.text
    assert not (tmp_path / "out").exists()
