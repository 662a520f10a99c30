"""Extension points: a new pruning method, checkpoint format and architecture override, each
registered from this file alone (no library file edited), run through prune and save_pretrained."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hfprune
from hfprune.arch import ArchSpec
from hfprune.cli import build_parser
from hfprune.config import PruningConfig
from hfprune.formats import register_format
from hfprune.methods.base import Pruner
from hfprune.registry import ARCHITECTURES, FORMATS, METHODS


@dataclass
class InverseMagnitudeConfig(PruningConfig):
    """Removes the LARGEST weights: easy to tell apart from every built-in method."""

    method: ClassVar[str] = "test-inverse-magnitude"


class InverseMagnitudePruner(Pruner):
    def score(self, W, stats):
        return -W.abs().float()


class TorchSaveFormat:
    """A format that stores the state dict with torch.save beside config.json."""

    def validate(self, model, bits, group_size, record) -> None:
        if bits is not None:
            raise ValueError("format='test-torch' does not quantize: drop bits.")

    def save(self, model, directory, *, record, bits, group_size, max_shard_size) -> None:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, directory / "weights.pt")
        model.config.save_pretrained(directory)
        (directory / "pattern.txt").write_text(record.pattern)


class BackboneLlama(LlamaForCausalLM):
    """A layout the built-in table does not know: the decoder blocks are reached as ``backbone.layers``."""

    @property
    def backbone(self):
        return self.model


@pytest.fixture
def registered():
    hfprune.register_pruner("test-inverse-magnitude", InverseMagnitudeConfig)(InverseMagnitudePruner)
    register_format("test-torch", TorchSaveFormat())
    hfprune.register_architecture("test-backbone-llama", ArchSpec(layers="backbone.layers"))
    try:
        yield
    finally:
        METHODS.pop("test-inverse-magnitude", None)
        FORMATS.pop("test-torch", None)
        ARCHITECTURES.pop("test-backbone-llama", None)


def test_new_method_format_and_architecture(registered, tmp_path):
    torch.manual_seed(0)
    model = BackboneLlama(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64))
    model.config.model_type = "test-backbone-llama"
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    report = hfprune.prune(model, config={"method": "test-inverse-magnitude", "sparsity": 0.5, "pattern": "2:4"},
                           progress=False)

    assert report.method == "test-inverse-magnitude" and report.pattern == "2:4"
    assert report.sparsity == pytest.approx(0.5)
    assert report.layers and all(name.startswith("backbone.layers.") for name in report.layers)
    w0, w = dense["model.layers.0.mlp.up_proj"], model.model.layers[0].mlp.up_proj.weight.detach()
    groups, kept = w0.abs().view(w.shape[0], -1, 4), (w != 0).view(w.shape[0], -1, 4)
    assert (kept.sum(-1) == 2).all()  # 2:4, and the two smallest magnitudes of every group are the ones kept
    assert torch.equal(kept, groups <= groups.sort(-1).values[..., 1:2])

    out = hfprune.save_pretrained(model, tmp_path / "out", format="test-torch", report=report)

    assert (out / "pattern.txt").read_text() == "2:4"
    saved = torch.load(out / "weights.pt")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pruning_config"]["method"] == "test-inverse-magnitude"
    assert json.loads((out / "pruning_report.json").read_text())["sparsity"] == pytest.approx(0.5)
    assert "test-inverse-magnitude" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match="does not quantize"):
        hfprune.save_pretrained(model, tmp_path / "q", format="test-torch", bits=4)
    assert not (tmp_path / "q").exists()
    assert "test-inverse-magnitude" in hfprune.available_methods()
    args = build_parser().parse_args(["prune", "--model", "m", "--output", "o", "--format", "test-torch"])
    assert args.format == "test-torch"
