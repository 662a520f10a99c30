"""--low-memory: prune a sharded safetensors checkpoint block by block into output shards."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hfprune
from hfprune.cli import main
from hfprune.core.engine import resolve_calibration
from hfprune.workflows.streaming import prune_checkpoint, work_dir_for

from conftest import load_sharded, tiny_model

TEXT = "Pruning removes weights from a neural network to make it smaller. " * 40


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    tiny_model("llama", tie_word_embeddings=True, num_hidden_layers=3).save_pretrained(path, max_shard_size="100KB")
    return path




@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_low_memory_matches_in_memory(sharded, tmp_path, method, monkeypatch):
    from hfprune.workflows import streaming

    if method == "wanda":  # also put the (tiny) embeddings and final norm on disk, as for real models
        monkeypatch.setattr(streaming, "_SMALL", 0)
    ids = torch.randint(3, 320, (8, 32), generator=torch.Generator().manual_seed(2))
    cfg = hfprune.PruningConfig.from_dict({"method": method, "sparsity": 0.5})
    ref = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)
    ref_report = hfprune.prune(ref, config=cfg, calibration=ids, batch_size=2, progress=False)
    out = tmp_path / "out"
    report = prune_checkpoint(sharded, out, cfg, resolve_calibration(ids, batch_size=2), low_memory=True)
    assert report.layers == ref_report.layers and report.peak_rss_mb > 0
    assert report.model_sparsity == pytest.approx(ref_report.model_sparsity)
    index, tensors = load_sharded(out)
    in_index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(in_index["weight_map"])  # same names; lm_head stays tied (absent)
    assert "lm_head.weight" not in tensors
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(set(index["weight_map"].values())) == 4  # one shard per block + one for the rest
    ref_state = ref.state_dict()
    assert all(torch.equal(tensors[k], ref_state[k]) for k in tensors)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert reloaded.config.pruning_config["method"] == method
    assert not work_dir_for(out).exists()


def test_cli_low_memory(sharded, tmp_path, tiny_tokenizer):
    model_dir = tmp_path / "base"
    model_dir.mkdir()
    for f in sharded.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    tiny_tokenizer.save_pretrained(model_dir)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join([TEXT] * 5))
    common = ["prune", "--model", str(model_dir), "--calibration", str(calib), "--nsamples", "4", "--seqlen", "32",
              "--method", "wanda", "--pattern", "2:4", "--batch-size", "2"]
    assert main(common + ["--output", str(tmp_path / "a")]) == 0
    assert main(common + ["--low-memory", "--output", str(tmp_path / "b")]) == 0
    _, a = load_sharded(tmp_path / "a") if (tmp_path / "a" / "model.safetensors.index.json").exists() else (None, None)
    if a is None:
        with safe_open(str(tmp_path / "a" / "model.safetensors"), framework="pt") as fh:
            a = {k: fh.get_tensor(k) for k in fh.keys()}
    _, b = load_sharded(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "b" / "pruning_report.json").read_text())
    assert report["peak_rss_mb"] > 0 and report["sparsity"] == pytest.approx(0.5)
    assert (tmp_path / "b" / "tokenizer.json").exists() and (tmp_path / "b" / "README.md").exists()
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert "--low-memory" in cfg["pruning_config"]["command"]


def test_low_memory_needs_safetensors_folder(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    assert main(["prune", "--model", str(tmp_path / "empty"), "--method", "magnitude", "--low-memory",
                 "--output", str(tmp_path / "out")]) == 2
    assert "safetensors" in caplog.text
