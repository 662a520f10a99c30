"""Tests for the ADMM solver (hfprune.solvers.admm) and its method wiring, CPU only and small."""

from __future__ import annotations

import pytest
import torch

import hfprune
from hfprune.solvers.masks import check_nm, parse_pattern, prune_count
from hfprune.solvers import admm_prune, sparsegpt_prune
from hfprune.stats import HessianStats
from hfprune.solvers.admm import gradual_sparsity, project
from hfprune.solvers.lstsq import relative_output_error

from conftest import solver_layer

OUT, IN, TOKENS = 64, 128, 512


@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.777, 0.9])
@pytest.mark.parametrize("scope", ["layer", "row"])
def test_unstructured_count_exact(sparsity, scope):
    w, _, h = solver_layer()
    new_w, pruned = admm_prune(w, h, sparsity, scope=scope, iterations=6, prune_iterations=4)
    k = prune_count(w.numel(), sparsity)
    assert int(pruned.sum()) == k
    assert int((new_w == 0).sum()) == k
    assert torch.equal(new_w == 0, pruned)
    if scope == "row" and k % OUT == 0:
        assert bool((pruned.sum(1) == k // OUT).all())


def test_count_exact_with_ties():
    # Weights on a coarse grid (as SmolLM2's): many equal magnitudes at the cut.
    w, _, h = solver_layer(1)
    w = torch.round(w * 2) / 2
    for s in (0.3, 0.5, 0.7):
        _, pruned = admm_prune(w, h, s, iterations=4, prune_iterations=2)
        assert int(pruned.sum()) == prune_count(w.numel(), s)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_valid_and_exact(pattern):
    w, _, h = solver_layer()
    pat = parse_pattern(pattern)
    new_w, pruned = admm_prune(w, h, 0.0, pattern)  # sparsity is implied by the pattern
    assert check_nm(new_w, pat.n, pat.m)
    assert bool(((~pruned).reshape(OUT, -1, pat.m).sum(-1) == pat.n).all())
    assert torch.equal(new_w == 0, pruned)


@pytest.mark.parametrize("setting", [("unstructured", 0.5), ("2:4", 0.5), ("unstructured", 0.7), ("4:8", 0.5)])
def test_error_below_sparsegpt(setting):
    pattern, sparsity = setting
    for seed in (0, 1, 2):
        w, x, h = solver_layer(seed)
        ours, _ = admm_prune(w, h, sparsity, pattern)
        theirs, _ = sparsegpt_prune(w, h, sparsity, pattern)
        assert relative_output_error(w, ours, h) < relative_output_error(w, theirs, h), seed


def test_more_iterations_do_not_hurt_much_and_help_over_weight_only():
    w, _, h = solver_layer(3)
    fixed, _ = admm_prune(w, h, 0.6, iterations=10, prune_iterations=0)  # Wanda-like mask, weights re-solved
    gradual, _ = admm_prune(w, h, 0.6, iterations=10, prune_iterations=7)
    assert relative_output_error(w, gradual, h) < relative_output_error(w, fixed, h)


def test_deterministic_and_input_untouched():
    w, _, h = solver_layer()
    w0, h0 = w.clone(), h.clone()
    a = admm_prune(w.to(torch.bfloat16), h, 0.5)
    b = admm_prune(w.to(torch.bfloat16), h, 0.5)
    assert a[0].dtype == torch.bfloat16 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(w, w0) and torch.equal(h, h0)


def test_dead_inputs_are_pruned_first():
    w, x, _ = solver_layer()
    x[:, :8] = 0
    stats = HessianStats(IN)
    stats.add_batch(x)
    _, pruned = admm_prune(w, stats.hessian(), 0.25)
    assert bool(pruned[:, :8].all())


@pytest.mark.parametrize("bits,group_size", [(4, None), (4, 32), (8, None)])
def test_joint_quantization_grid(bits, group_size):
    w, _, h = solver_layer()
    new_w, pruned = admm_prune(w, h, 0.5, "2:4", bits=bits, group_size=group_size)
    assert check_nm(new_w, 2, 4) and torch.equal(new_w == 0, pruned) or bool((new_w[pruned] == 0).all())
    step = group_size or IN
    for r in range(OUT):
        for c in range(0, IN, step):
            assert torch.unique(new_w[r, c:c + step]).numel() <= 2**bits
    # Joint quantization costs less than rounding the ADMM solution afterwards.
    from hfprune.solvers import quantize_weight

    sparse, mask = admm_prune(w, h, 0.5, "2:4")
    rounded = quantize_weight(sparse, bits, group_size).masked_fill(mask, 0)
    assert relative_output_error(w, new_w, h) <= relative_output_error(w, rounded, h)


def test_schedule_and_projection():
    assert gradual_sparsity(0, 4, 0.8) == 0.0
    assert gradual_sparsity(4, 4, 0.8) == 0.8 and gradual_sparsity(9, 4, 0.8) == 0.8
    assert 0 < gradual_sparsity(1, 4, 0.8) < gradual_sparsity(2, 4, 0.8) < 0.8
    v = torch.randn(32, 64)
    nm = parse_pattern("2:4")
    partial = project(v, 0.25, nm, exact=True)
    assert int(partial.sum()) == prune_count(v.numel(), 0.25)
    full = project(v, 0.5, nm)
    assert bool((partial <= full).all())  # the gradual masks only prune outside each group's top N


def test_invalid_arguments():
    w, _, h = solver_layer()
    with pytest.raises(ValueError, match="sparsity"):
        admm_prune(w, h, 1.0)
    with pytest.raises(ValueError, match="multiple of 4"):
        admm_prune(w[:, :6], h[:6, :6], 0.5, "2:4")
    with pytest.raises(ValueError, match="Hessian"):
        admm_prune(w, h[:4, :4], 0.5)
    with pytest.raises(ValueError, match="prune_iterations"):
        admm_prune(w, h, 0.5, iterations=3, prune_iterations=5)
    with pytest.raises(ValueError, match="iterations"):
        hfprune.ADMMConfig(iterations=0)


def test_config_round_trip_and_scope():
    cfg = hfprune.ADMMConfig(sparsity=0.7, bits=4, group_size=64)
    assert cfg.scope == "layer"
    assert hfprune.PruningConfig.from_dict(cfg.to_dict()) == cfg
    nm = hfprune.ADMMConfig(pattern="2:4")
    assert nm.scope == "row" and nm.sparsity == 0.5
    assert hfprune.PruningConfig.from_dict(nm.to_dict()) == nm
    assert "admm" in hfprune.available_methods()


def test_report_has_admm_output_errors(random_ids):
    from conftest import tiny_model

    model = tiny_model("llama")
    report = hfprune.prune(model, config=hfprune.ADMMConfig(pattern="2:4"), calibration=random_ids, progress=False)
    errors = [v["output_error"] for v in report.layers.values()]
    assert len(errors) == len(report.layers) and all(0 < e < 1 for e in errors)


def test_nth_largest_sorting_network_matches_topk_with_ties():
    from hfprune.solvers.admm import _nth_largest

    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 4, (64, 32, 4), generator=g).float()  # many ties, as on a quantized grid
    groups = torch.cat([groups, torch.randn(8, 32, 4, generator=g).abs()])
    assert torch.equal(_nth_largest(groups, 2), torch.topk(groups, 2, dim=-1).values[..., -1:])
    for n, m in ((1, 4), (3, 4), (4, 8)):  # other patterns use topk
        x = torch.randn(16, 8, m, generator=g)
        assert torch.equal(_nth_largest(x, n), torch.topk(x, n, dim=-1).values[..., -1:])
