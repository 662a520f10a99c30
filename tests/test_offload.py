"""Pruning Accelerate-offloaded models: the runner onloads one block at a time and writes back."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfprune
from hfprune.core.runner import LayerRunner, is_offloaded

from conftest import tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model("llama").save_pretrained(path, max_shard_size="100KB")
    return path


@pytest.fixture(scope="module")
def reference(checkpoint, calib_ids):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    report = hfprune.prune(model, config=hfprune.SparseGPTConfig(sparsity=0.5), calibration=calib_ids,
                           batch_size=2, progress=False)
    return model, report


@pytest.fixture(scope="module")
def calib_ids():
    return torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(1))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("device_map", ["auto", "mixed"])
def test_disk_offloaded_model_is_pruned_like_in_memory(checkpoint, reference, calib_ids, tmp_path, device_map):
    if device_map == "mixed":
        device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                      "model.layers.0": "cpu", "model.layers.1": "disk"}
    offload = tmp_path / "offload"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device_map=device_map,
                                                 max_memory={"cpu": 60_000} if device_map == "auto" else None,
                                                 offload_folder=str(offload))
    assert is_offloaded(model)
    report = hfprune.prune(model, config=hfprune.SparseGPTConfig(sparsity=0.5), calibration=calib_ids,
                           batch_size=2, progress=False)
    ref_model, ref_report = reference
    assert report.layers == ref_report.layers
    assert report.model_sparsity == pytest.approx(ref_report.model_sparsity)
    # Still offloaded, and the offload index points at the pruned block file, not the input shard.
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    loader = model.model.layers[1].mlp.up_proj._hf_hook.weights_map.dataset
    entry = loader.index["model.layers.1.mlp.up_proj.weight"]
    assert entry["safetensors_file"].startswith(str(offload)) and "hfprune-block-00001" in entry["safetensors_file"]
    with torch.no_grad():
        assert torch.equal(model(calib_ids).logits, ref_model(calib_ids).logits)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    assert _same_weights(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ref_model)


def test_cpu_offload_writes_back_into_weights_map(checkpoint, reference, calib_ids):
    from accelerate import cpu_offload

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    cpu_offload(model, execution_device="cpu")
    assert is_offloaded(model)
    hfprune.prune(model, config=hfprune.SparseGPTConfig(sparsity=0.5), calibration=calib_ids, batch_size=2,
                  progress=False)
    ref_model = reference[0]
    hook = model.model.layers[0].self_attn.q_proj._hf_hook
    stored = hook.weights_map["weight"]
    assert torch.equal(stored, ref_model.model.layers[0].self_attn.q_proj.weight)
    with torch.no_grad():
        assert torch.equal(model(calib_ids).logits, ref_model(calib_ids).logits)


def test_onload_context_materializes_and_offloads(checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device_map="auto",
                                                 max_memory={"cpu": 60_000}, offload_folder=str(tmp_path / "o"))
    runner = LayerRunner(model)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.weight.device.type == "meta"
    with runner.onload(0) as block:
        assert block.offloaded and layer.weight.device.type == "cpu"
        layer.weight.data.zero_()
        block.write_back()
    assert layer.weight.device.type == "meta"
    with runner.onload(0):
        assert not layer.weight.any()
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "llama"


def test_owl_allocation_on_offloaded_model(checkpoint, calib_ids, tmp_path):
    cfg = hfprune.WandaConfig(sparsity=0.5, owl=True)
    ref = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    r1 = hfprune.prune(ref, config=cfg, calibration=calib_ids, batch_size=2, progress=False)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device_map="auto",
                                                 max_memory={"cpu": 60_000}, offload_folder=str(tmp_path / "o"))
    r2 = hfprune.prune(model, config=cfg, calibration=calib_ids, batch_size=2, progress=False)
    assert r1.layers == r2.layers


def test_structured_refuses_offloaded_model(checkpoint, tmp_path):
    from hfprune.structured import StructuredConfig

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device_map="auto",
                                                 max_memory={"cpu": 60_000}, offload_folder=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="in memory"):
        hfprune.prune(model, config=StructuredConfig(mlp_ratio=0.25, importance="magnitude"), progress=False)
