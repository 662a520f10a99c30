"""Conformance suite: every claimed architecture x every registered one-shot method."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfprune
from hfprune.arch import find_linears, get_blocks, get_spec, weight_matrix
from hfprune.solvers.masks import check_nm, prune_count

from conftest import replay_blocks, tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2", "opt", "phi3", "phi", "gpt_neox"]

CASES = [
    ("magnitude", {"sparsity": 0.5}),
    ("wanda", {"sparsity": 0.3}),
    ("wanda", {"pattern": "2:4"}),
    ("wanda", {"pattern": "4:8"}),
    ("wanda", {"sparsity": 0.6, "scope": "layer"}),
    ("wanda", {"sparsity": 0.5, "true_sequential": True}),
    ("sparsegpt", {"sparsity": 0.5}),
    ("sparsegpt", {"pattern": "2:4", "block_size": 16}),
    ("admm", {"sparsity": 0.5}),
    ("admm", {"pattern": "2:4", "iterations": 6, "prune_iterations": 4}),
]


def _pruned_layers(model):
    spec = get_spec(model)
    return [(f"{spec.layers}.{i}.{n}", m) for i, b in enumerate(get_blocks(model, spec)) for n, m in find_linears(b).items()]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,kwargs", CASES, ids=lambda c: str(c))
def test_prune_every_architecture(arch, method, kwargs, random_ids, tmp_path):
    model = tiny_model(arch)
    config = hfprune.PruningConfig.from_dict({"method": method, **kwargs})
    report = hfprune.prune(model, config=config, calibration=random_ids, progress=False)

    layers = _pruned_layers(model)
    assert len(report.layers) == len(layers) > 0
    for name, module in layers:
        W = weight_matrix(module)
        zeros = int((W == 0).sum())
        if config.pattern == "unstructured":
            assert zeros == prune_count(W.numel(), config.sparsity), name
        else:
            n, m = map(int, config.pattern.split(":"))
            assert check_nm(W, n, m), name
            assert zeros >= W.numel() * (m - n) // m
    # lm_head and embeddings are not pruned
    assert (model.get_input_embeddings().weight != 0).float().mean() > 0.99

    with torch.no_grad():
        logits = model(random_ids).logits
    assert torch.isfinite(logits).all()

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(random_ids).logits, logits)
    assert reloaded.config.pruning_config["method"] == method


def test_gpt2_conv1d_is_pruned_along_inputs(random_ids):
    model = tiny_model("gpt2")
    hfprune.prune(model, config=hfprune.WandaConfig(pattern="2:4"), calibration=random_ids, progress=False)
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D weight is [in, out]
    assert check_nm(c_fc.weight.t(), 2, 4)
    assert not check_nm(c_fc.weight, 2, 4) or c_fc.weight.shape[0] % 4 == 0


def test_unknown_architecture_error():
    class Cfg:
        model_type = "no_such_model"

    model = torch.nn.Linear(2, 2)
    model.config = Cfg()
    with pytest.raises(ValueError, match="register_architecture"):
        hfprune.prune(model, config=hfprune.MagnitudeConfig())


def test_register_architecture_makes_a_model_prunable(random_ids):
    from hfprune.arch import ARCHITECTURES, ArchSpec

    model = tiny_model("llama")
    model.config.model_type = "my_llama_clone"
    hfprune.register_architecture("my_llama_clone", ArchSpec(layers="model.layers"))
    try:
        report = hfprune.prune(model, config=hfprune.MagnitudeConfig(sparsity=0.5), progress=False)
        assert report.sparsity == pytest.approx(0.5)
        with pytest.raises(ValueError, match="already registered"):
            hfprune.register_architecture("my_llama_clone", ArchSpec(layers="model.layers"))
    finally:
        ARCHITECTURES.pop("my_llama_clone", None)


def test_sliding_window_layers_get_their_own_masks(random_ids):
    """Gemma-2 alternates sliding and full attention: each block must be replayed with its own mask."""
    model = tiny_model("gemma2")
    ids = torch.randint(3, 200, (1, 48))
    hidden = replay_blocks(model, ids)  # the blocks replayed densely, compared with the model's own hidden states
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
    # hidden_states[-1] has the final norm applied; compare the input of the last block's output
    # through the norm.
    final = model.model.norm(hidden)
    assert torch.allclose(final, ref[-1], atol=1e-5)
