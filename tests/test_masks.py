import pytest
import torch

from hfprune.solvers.masks import (check_nm, global_budgets, layer_mask, nm_mask, parse_pattern, prune_count, row_mask,
                           select_mask)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.77, 0.99])
@pytest.mark.parametrize("shape", [(7, 12), (16, 64), (3, 5)])
def test_row_and_layer_masks_are_exact(sparsity, shape):
    score = torch.rand(shape)
    for fn in (row_mask, layer_mask):
        mask = fn(score, sparsity)
        assert mask.dtype == torch.bool and mask.shape == score.shape
        assert int(mask.sum()) == prune_count(score.numel(), sparsity)


def test_masks_exact_with_ties():
    # Weights from a 4-bit grid: only 4 distinct values, thresholds would over-prune.
    score = torch.randint(0, 4, (32, 64)).float()
    assert int(row_mask(score, 0.5).sum()) == 32 * 32
    assert int(layer_mask(score, 0.37).sum()) == prune_count(score.numel(), 0.37)


def test_row_mask_balances_rows():
    score = torch.rand(10, 20)
    mask = row_mask(score, 0.5)
    assert (mask.sum(1) == 10).all()
    # within a row, every pruned score is <= every kept score
    for r in range(10):
        assert score[r][mask[r]].max() <= score[r][~mask[r]].min()


def test_layer_mask_prunes_lowest():
    score = torch.rand(8, 8)
    mask = layer_mask(score, 0.25)
    assert score[mask].max() <= score[~mask].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_holds_in_every_group(n, m):
    score = torch.rand(16, 64)
    mask = nm_mask(score, n, m)
    kept = (~mask).reshape(16, 64 // m, m).sum(-1)
    assert (kept == n).all()
    W = torch.randn(16, 64).masked_fill(mask, 0)
    assert check_nm(W, n, m)


def test_nm_mask_rejects_bad_width():
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(torch.rand(4, 10), 2, 4)


@pytest.mark.parametrize("bad", ["4:4", "5:4", "0:4", "2-4", "abc"])
def test_parse_pattern_rejects(bad):
    with pytest.raises(ValueError):
        parse_pattern(bad)


def test_parse_pattern():
    assert str(parse_pattern("2:4")) == "2:4" and parse_pattern("2:4").sparsity == 0.5
    assert not parse_pattern("unstructured").is_nm


def test_global_budgets_exact_and_lowest():
    scores = {"a": torch.rand(10, 10), "b": torch.rand(5, 5) * 0.5}
    budgets = global_budgets(scores, 0.4)
    assert sum(budgets.values()) == prune_count(125, 0.4)
    flat = torch.cat([scores["a"].flatten(), scores["b"].flatten()])
    threshold = flat.sort().values[sum(budgets.values()) - 1]
    assert budgets["a"] == int((scores["a"] <= threshold).sum())


def test_select_mask_dispatch():
    score = torch.rand(4, 8)
    assert int(select_mask(score, 0.5, "2:4").sum()) == 16
    assert int(select_mask(score, 0.25, "unstructured", "layer").sum()) == 8
    with pytest.raises(ValueError, match="scope"):
        select_mask(score, 0.5, "unstructured", "bogus")


def test_lowest_k_indices_exact_with_ties():
    from hfprune.solvers.masks import lowest_k_indices

    score = torch.tensor([3.0, 1.0, 1.0, 1.0, 2.0, 0.5, 1.0, 4.0]).reshape(2, 4)
    for k in range(0, 9):
        idx = lowest_k_indices(score, k)
        assert idx.numel() == k and idx.unique().numel() == k
        chosen = score.reshape(-1)[idx]
        rest = torch.ones(8, dtype=torch.bool)
        rest[idx] = False
        if 0 < k < 8:
            assert chosen.max() <= score.reshape(-1)[rest].min()
    # Same input, same answer (deterministic tie-breaking).
    assert torch.equal(lowest_k_indices(score, 3), lowest_k_indices(score.clone(), 3))


@pytest.mark.parametrize("pattern,sparsity,scope", [("unstructured", 0.5, "row"), ("2:4", 0.5, "row"),
                                                    ("unstructured", 0.3, "row"), ("unstructured", 0.5, "layer")])
def test_row_chunked_selection_equals_one_call(monkeypatch, pattern, sparsity, scope):
    import hfprune
    from hfprune.methods import base
    from hfprune.registry import get_pruner_cls

    monkeypatch.setattr(base, "ROW_CHUNK_ELEMENTS", 700 * 7)  # chunks of 7 rows
    W = torch.randint(-8, 8, (61, 700), generator=torch.Generator().manual_seed(0)).float() * 0.01  # many ties
    cfg = hfprune.MagnitudeConfig(sparsity=sparsity, pattern=pattern, scope=scope)
    pruner = get_pruner_cls("magnitude")(cfg)
    chunked = pruner.prune_weight(W, None, cfg.sparsity, scope).pruned
    assert torch.equal(chunked, select_mask(pruner.score(W, None), cfg.sparsity, pattern, scope))
