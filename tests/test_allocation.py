"""Tests for OWL allocation and explicit per-layer sparsity specs (hfprune.core.allocation)."""

from __future__ import annotations

import pytest
import torch

from hfprune.core.allocation import expand_layer_sparsity, outlier_ratio, owl_sparsities


def _weighted_mean(values, counts):
    return sum(v * c for v, c in zip(values, counts)) / sum(counts)


def test_outlier_ratio_single_tensor():
    score = torch.ones(1000)
    score[:10] = 100.0  # mean = 1.99, threshold 9.95: exactly the 10 large entries
    assert outlier_ratio(score, m=5.0) == pytest.approx(0.01)
    assert outlier_ratio(torch.ones(10, 10)) == 0.0
    # Raising M can only lower the ratio.
    g = torch.Generator().manual_seed(0)
    heavy = torch.randn(200, 200, generator=g).abs() ** 4
    assert outlier_ratio(heavy, 3.0) > outlier_ratio(heavy, 7.0) > 0


def test_outlier_ratio_block_aggregation():
    a = torch.ones(1000)
    a[:10] = 100.0  # 10 outliers against its own mean
    b = torch.full((3000,), 50.0)  # none against its own mean
    # Per-layer means, counts weighted by size: 10 / 4000.
    assert outlier_ratio([a, b], m=5.0) == pytest.approx(10 / 4000)
    # One block-wide mean (reference-code behaviour): b's scale hides a's outliers.
    assert outlier_ratio([a, b], m=5.0, per_layer_mean=False) == 0.0
    with pytest.raises(ValueError):
        outlier_ratio([])


def test_owl_mean_and_order():
    ratios = [0.02, 0.08, 0.05, 0.01, 0.03, 0.07]
    counts = [100, 100, 300, 50, 200, 250]
    result = owl_sparsities(ratios, counts, target=0.6, lam=0.08)
    assert _weighted_mean(result, counts) == pytest.approx(0.6, abs=1e-9)
    order_by_ratio = sorted(range(6), key=lambda i: ratios[i])
    sparsities_in_that_order = [result[i] for i in order_by_ratio]
    assert sparsities_in_that_order == sorted(sparsities_in_that_order, reverse=True)
    assert len(set(result)) == 6
    # Range before the shift is 2*lam wide and the shift is common to all blocks.
    assert max(result) - min(result) == pytest.approx(0.16)
    # Equal ratios: everybody gets the target.
    assert owl_sparsities([0.1] * 3, [1, 2, 3], 0.5) == pytest.approx([0.5] * 3)
    # lam = 0 means uniform.
    assert owl_sparsities(ratios, counts, 0.5, lam=0.0) == pytest.approx([0.5] * 6)


def test_owl_equal_counts_matches_linear_map():
    result = owl_sparsities([0.0, 0.5, 1.0], [1, 1, 1], target=0.5, lam=0.1)
    assert result == pytest.approx([0.6, 0.5, 0.4])


def test_owl_clipping_keeps_mean():
    ratios = [0.0, 0.01, 0.02, 0.2, 0.3]
    counts = [10, 10, 10, 10, 60]
    result = owl_sparsities(ratios, counts, target=0.05, lam=0.1)
    assert min(result) == 0.0  # clipped at the floor
    assert all(0.0 <= v < 1.0 for v in result)
    assert _weighted_mean(result, counts) == pytest.approx(0.05, abs=1e-9)
    order = sorted(range(5), key=lambda i: ratios[i])
    assert [result[i] for i in order] == sorted(result, reverse=True)

    high = owl_sparsities([0.9, 0.0, 0.0, 0.0], [1, 1, 1, 1], target=0.95, lam=0.1,
                          max_sparsity=0.98)
    assert max(high) == 0.98
    assert _weighted_mean(high, [1] * 4) == pytest.approx(0.95, abs=1e-9)


def test_owl_rejects_impossible():
    with pytest.raises(ValueError, match="outside the allowed"):
        owl_sparsities([0.1, 0.2], [1, 1], target=0.995)
    with pytest.raises(ValueError, match="one of each"):
        owl_sparsities([0.1, 0.2], [1], target=0.5)
    with pytest.raises(ValueError, match="\\[0, 1\\)"):
        owl_sparsities([0.1, 0.2], [1, 1], target=1.0)
    with pytest.raises(ValueError, match="positive parameter count"):
        owl_sparsities([0.1, 0.2], [1, 0], target=0.5)


NAMES = [f"model.layers.{b}.{m}" for b in range(3)
         for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")] + ["lm_head"]


def _block_of(name):
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


def test_expand_list_and_number():
    result = expand_layer_sparsity([0.4, 0.5, 0.6], NAMES, _block_of)
    assert result["model.layers.0.self_attn.q_proj"] == 0.4
    assert result["model.layers.2.mlp.down_proj"] == 0.6
    assert "lm_head" not in result and len(result) == 9
    block_map = {n: _block_of(n) for n in NAMES}
    assert expand_layer_sparsity((0.4, 0.5, 0.6), NAMES, block_map) == result
    assert expand_layer_sparsity(0.3, NAMES, _block_of) == {n: 0.3 for n in NAMES}


def test_expand_dict_first_match_wins():
    spec = {r"down_proj$": 0.2, 1: 0.7, "2": 0.1}
    result = expand_layer_sparsity(spec, NAMES, _block_of)
    assert result["model.layers.1.mlp.down_proj"] == 0.2  # regex listed first
    assert result["model.layers.1.self_attn.q_proj"] == 0.7
    assert result["model.layers.2.self_attn.o_proj"] == 0.1  # digit string = block index
    assert "model.layers.0.self_attn.q_proj" not in result  # unmatched: caller's default


@pytest.mark.parametrize("spec, message", [
    ([0.5, 1.0, 0.5], "block 1"),
    ([0.5, 50, 0.5], "meant 50%, write 0.5"),
    ([0.5, -0.1, 0.5], "\\[0, 1\\)"),
    ([0.5, 0.5], "3 decoder blocks"),
    ({5: 0.5}, "blocks are 0..2"),
    ({"mlp.up_proj": 0.5}, "matches no prunable module"),
    ({"[": 0.5}, "not a valid regex"),
    ({"q_proj": "half"}, "number"),
    ({"q_proj": True}, "number"),
    ("0.5", "must be a number, a list"),
])
def test_expand_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        expand_layer_sparsity(spec, NAMES, _block_of)
