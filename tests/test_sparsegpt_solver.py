"""Tests for the SparseGPT solver (hfprune.solvers.sparsegpt), CPU only and small."""

from __future__ import annotations

import logging

import pytest
import torch

from hfprune.solvers.masks import check_nm, layer_mask, nm_mask, prune_count, row_mask
from hfprune.solvers import quantize_weight, sparsegpt_prune
from hfprune.stats import HessianStats

from conftest import solver_layer

OUT, IN, TOKENS = 64, 128, 512


def _rel_err(w, w2, x):
    return float((x @ (w - w2).T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_beats_magnitude_and_wanda(pattern):
    w, x, h = solver_layer()
    new_w, pruned = sparsegpt_prune(w, h, 0.5, pattern, block_size=32)
    wanda_score = w.abs() * x.norm(dim=0)
    if pattern == "unstructured":
        wanda = row_mask(wanda_score, 0.5)
        magnitude = layer_mask(w.abs(), 0.5)
    else:
        n, m = map(int, pattern.split(":"))
        wanda = nm_mask(wanda_score, n, m)
        magnitude = nm_mask(w.abs(), n, m)
    err = _rel_err(w, new_w, x)
    err_wanda = _rel_err(w, w.masked_fill(wanda, 0), x)
    err_mag = _rel_err(w, w.masked_fill(magnitude, 0), x)
    assert err < 0.9 * err_wanda
    assert err_wanda < err_mag
    # Same number of zeros as the baselines, and the mask matches the zeros.
    assert int(pruned.sum()) == int(wanda.sum()) == OUT * IN // 2
    assert torch.equal(new_w == 0, pruned)
    if pattern != "unstructured":
        n, m = map(int, pattern.split(":"))
        assert check_nm(new_w, n, m)
        assert check_nm((~pruned).float(), n, m)
        # Exactly M-N pruned in every group, not just at most.
        assert bool(((~pruned).reshape(OUT, -1, m).sum(-1) == n).all())


@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.777, 0.9])
@pytest.mark.parametrize("block_size", [32, 50, 128])
def test_unstructured_count_exact(sparsity, block_size):
    w, _, h = solver_layer(1)
    new_w, pruned = sparsegpt_prune(w, h, sparsity, block_size=block_size)
    assert int(pruned.sum()) == prune_count(w.numel(), sparsity)
    assert int((new_w == 0).sum()) == prune_count(w.numel(), sparsity)


def test_count_exact_with_ties():
    # Weights from a 4-bit grid and an identity Hessian: many tied scores.
    g = torch.Generator().manual_seed(2)
    w = torch.randint(-8, 8, (OUT, IN), generator=g).float() * 0.1
    new_w, pruned = sparsegpt_prune(w, torch.eye(IN), 0.3, block_size=48)
    assert int(pruned.sum()) == prune_count(w.numel(), 0.3)
    # Identity Hessian: no compensation, kept weights are untouched.
    assert torch.equal(new_w[~pruned], w[~pruned])


def test_zero_sparsity_is_identity():
    w, _, h = solver_layer()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        wd = w.to(dtype)
        new_w, pruned = sparsegpt_prune(wd, h, 0.0)
        assert new_w.dtype == dtype
        assert torch.equal(new_w, wd)
        assert not pruned.any()


def test_dtype_and_input_untouched():
    w, _, h = solver_layer()
    wb = w.to(torch.bfloat16)
    before = wb.clone()
    new_w, pruned = sparsegpt_prune(wb, h, 0.5, "2:4")
    assert new_w.dtype == torch.bfloat16 and new_w.shape == wb.shape
    assert torch.equal(wb, before)
    assert check_nm(new_w, 2, 4)


def test_nm_independent_of_block_size():
    # N:M masks are chosen per group of M columns, so the lazy batch update must give the
    # same result for every block size (up to float32 round-off).
    w, _, h = solver_layer(3)
    a, ma = sparsegpt_prune(w, h, 0.5, "2:4", block_size=8)
    b, mb = sparsegpt_prune(w, h, 0.5, "2:4", block_size=128)
    assert torch.equal(ma, mb)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_dead_columns():
    w, x, _ = solver_layer(4)
    dead = torch.zeros(IN, dtype=torch.bool)
    dead[[0, 5, 77, 127]] = True
    x = x.clone()
    x[:, dead] = 0
    stats = HessianStats(IN)
    stats.add_batch(x)
    h = stats.hessian()
    assert bool((torch.diagonal(h)[dead] == 0).all())
    for pattern in ("unstructured", "2:4"):
        new_w, pruned = sparsegpt_prune(w, h, 0.5, pattern)
        assert torch.isfinite(new_w).all()
        assert bool((new_w[:, dead] == 0).all())
        assert int(pruned.sum()) == OUT * IN // 2
        score = w.abs() * x.norm(dim=0)
        wanda = row_mask(score, 0.5) if pattern == "unstructured" else nm_mask(score, 2, 4)
        assert _rel_err(w, new_w, x) < _rel_err(w, w.masked_fill(wanda, 0), x)


def test_cholesky_failure_falls_back(caplog):
    w, _, _ = solver_layer()
    singular = torch.ones(IN, IN)  # rank 1 with a non-zero diagonal: Cholesky fails undamped
    with caplog.at_level(logging.WARNING, logger="hfprune.solvers.sparsegpt"):
        new_w, pruned = sparsegpt_prune(w, singular, 0.5, dampening=0.0)
    assert any("Cholesky" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(new_w).all()
    assert int(pruned.sum()) == OUT * IN // 2


def test_invalid_arguments():
    w, _, h = solver_layer()
    with pytest.raises(ValueError, match="sparsity"):
        sparsegpt_prune(w, h, 1.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        sparsegpt_prune(w[:, :124], h[:124, :124], 0.5, "4:8")
    with pytest.raises(ValueError, match="Hessian"):
        sparsegpt_prune(w, h[:64, :64], 0.5)
    with pytest.raises(ValueError, match="bits"):
        sparsegpt_prune(w, h, 0.5, bits=16)


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_joint_int4(group_size, pattern):
    w, x, h = solver_layer(5)
    joint, pruned = sparsegpt_prune(w, h, 0.5, pattern, block_size=48, bits=4, group_size=group_size)
    step = group_size or IN
    for start in range(0, IN, step):
        for row in joint[:, start:start + step]:
            assert len(torch.unique(row)) <= 16
    assert bool((joint[pruned] == 0).all())
    assert int(pruned.sum()) == OUT * IN // 2
    pruned_only, _ = sparsegpt_prune(w, h, 0.5, pattern, block_size=48)
    after = quantize_weight(pruned_only, 4, group_size)
    assert _rel_err(w, joint, x) < _rel_err(w, after, x)


def test_quantization_only_beats_rtn():
    # sparsity 0 with bits set is GPTQ: better than round-to-nearest.
    w, x, h = solver_layer(6)
    gptq, pruned = sparsegpt_prune(w, h, 0.0, bits=4, group_size=32)
    assert not pruned.any()
    assert _rel_err(w, gptq, x) < 0.9 * _rel_err(w, quantize_weight(w, 4, 32), x)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_weight(bits, sym):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(16, 96, generator=g) + (0.0 if sym else 0.5)
    q = quantize_weight(w, bits, group_size=32, sym=sym)
    assert q.shape == w.shape and q.dtype == w.dtype
    for start in range(0, 96, 32):
        block, qb = w[:, start:start + 32], q[:, start:start + 32]
        if sym:
            span = 2 * block.abs().max(1).values
        else:
            span = block.max(1).values.clamp(min=0) - block.min(1).values.clamp(max=0)
        step = span / (2**bits - 1)
        for r in range(16):
            values = torch.unique(qb[r])
            assert len(values) <= 2**bits
            # Zero is on the grid: the values are integer multiples of the step apart from 0.
            k = values / step[r]
            assert torch.allclose(k, k.round(), atol=1e-3)
        # Round to nearest over a range that covers the block: error at most half a step.
        limit = step[:, None] * 0.5 + 1e-5
        assert bool(((block - qb).abs() <= limit).all())
    assert quantize_weight(w.to(torch.bfloat16), bits).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        quantize_weight(w, None)


def test_hessian_stats():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 40, 16, generator=g)
    full = HessianStats(16)
    full.add_batch(x)
    expected = 2.0 / 120 * x.reshape(-1, 16).double().T @ x.reshape(-1, 16).double()
    assert full.count == 120
    assert full.hessian().dtype == torch.float32
    assert torch.allclose(full.hessian().double(), expected, atol=1e-5)
    assert torch.allclose(full.H, full.hessian())

    # Two halves merged (as after an all-reduce) equal the whole; bf16 inputs are accepted.
    a, b = HessianStats(16), HessianStats(16)
    a.add_batch(x[:1])
    b.add_batch(x[1:])
    assert torch.allclose(a.merge(b).hessian(), full.hessian(), atol=1e-6)
    restored = HessianStats(16)
    restored.load_state(full.state())
    assert restored.count == 120 and torch.equal(restored.hessian(), full.hessian())
    low = HessianStats(16)
    low.add_batch(x.to(torch.bfloat16))
    assert torch.allclose(low.hessian(), full.hessian(), rtol=0.05, atol=0.05)

    with pytest.raises(ValueError, match="last dimension"):
        full.add_batch(torch.randn(4, 15))
    with pytest.raises(ValueError, match="no calibration tokens"):
        HessianStats(16).hessian()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_act_order_keeps_pattern_and_maps_columns_back(pattern):
    w, x, h = solver_layer()
    new_w, pruned = sparsegpt_prune(w, h, 0.5, pattern, block_size=32, act_order=True)
    assert int(pruned.sum()) == OUT * IN // 2
    assert torch.equal(new_w == 0, pruned)
    if pattern == "2:4":
        assert bool(((~pruned).reshape(OUT, -1, 4).sum(-1) == 2).all())  # groups are the original columns
    if pattern == "2:4":
        # On these inputs ordering whole groups by importance lowers the 2:4 error; for unstructured
        # masks it does not (the adaptive mask then sees the least important columns last).
        plain, _ = sparsegpt_prune(w, h, 0.5, pattern, block_size=32)
        assert _rel_err(w, new_w, x) < _rel_err(w, plain, x)
    # A permutation of the inputs that act_order undoes: permuting W and H the same way and
    # permuting back gives the same result.
    perm = torch.randperm(IN // 4, generator=torch.Generator().manual_seed(1))
    perm = (perm[:, None] * 4 + torch.arange(4)).reshape(-1)
    inv = torch.argsort(perm)
    again, _ = sparsegpt_prune(w[:, perm], h[perm][:, perm], 0.5, pattern, block_size=32, act_order=True)
    assert torch.allclose(again[:, inv], new_w, atol=1e-5)


def test_act_order_refuses_quantization_groups():
    w, _x, h = solver_layer()
    with pytest.raises(ValueError, match="act_order"):
        sparsegpt_prune(w, h, 0.5, bits=4, group_size=32, act_order=True)


def test_output_error_matches_direct_computation():
    from hfprune.solvers.lstsq import relative_output_error

    w, x, h = solver_layer()
    new_w, _ = sparsegpt_prune(w, h, 0.5, "2:4", block_size=32)
    assert relative_output_error(w, new_w, h) == pytest.approx(_rel_err(w, new_w, x), rel=1e-4)
    assert relative_output_error(w, w, h) == 0.0


def test_report_has_sparsegpt_output_errors():
    import hfprune

    from conftest import tiny_model

    model = tiny_model("llama")
    report = hfprune.prune(model, None, hfprune.SparseGPTConfig(sparsity=0.5),
                           calibration=torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0)),
                           progress=False)
    errors = [info["output_error"] for info in report.layers.values()]
    assert len(errors) == len(report.layers) and all(0 < e < 1 for e in errors)
