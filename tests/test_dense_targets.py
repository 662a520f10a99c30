"""Dense targets: Hessian methods fit each layer to the dense block's ("block") or dense model's ("model") outputs."""

import collections
import copy

import pytest
import torch

import hfprune
from hfprune.solvers.lstsq import lstsq_fit, relative_output_error
from hfprune.stats import CrossStats, HessianStats

from conftest import tiny_model


def test_dense_target_fit_is_the_least_squares_fit():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 16, generator=g)
    Xd = torch.randn(400, 16, generator=g)
    X = Xd + 0.3 * torch.randn(400, 16, generator=g)  # the pruned model's inputs: the dense ones plus an error
    H, G = 2 / 400 * X.T @ X, 2 / 400 * X.T @ Xd
    Wt = lstsq_fit(W, H, G, dampening=0.0)
    ref = torch.linalg.lstsq(X.double(), (Xd @ W.T).double()).solution.T.float()
    torch.testing.assert_close(Wt, ref, rtol=1e-4, atol=1e-4)
    assert (X @ Wt.T - Xd @ W.T).norm() < (X @ W.T - Xd @ W.T).norm()
    # Damped, it is the former `dense_target_weight`: W + W (G - H)^T (H + lambda I)^-1, lambda = 1% of mean(diag H).
    X64, Xd64, W64 = X.double(), Xd.double(), W.double()
    H64, G64 = 2 / 400 * X64.T @ X64, 2 / 400 * X64.T @ Xd64
    lam = 0.01 * float(H64.diagonal().mean())
    old = W64 + torch.linalg.solve(H64 + lam * torch.eye(16, dtype=torch.float64), (G64 - H64) @ W64.T).T
    torch.testing.assert_close(lstsq_fit(W64, H64, G64, dampening=0.01), old, rtol=1e-10, atol=1e-10)
    # No error upstream: the target is the weight itself.
    torch.testing.assert_close(lstsq_fit(W, 2 / 400 * Xd.T @ Xd, 2 / 400 * Xd.T @ Xd, dampening=0.0), W,
                               rtol=1e-4, atol=1e-4)


def test_stats_split_merge_and_state_equal_one_pass():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 5, 8, generator=g) for _ in range(4)]
    xds = [x + 0.1 * torch.randn(x.shape, generator=g) for x in xs]
    one = CrossStats(8, dense_inputs=collections.deque(xds))
    for x in xs:
        one.add_batch(x)
    queue = collections.deque(xds)
    a, b = CrossStats(8, dense_inputs=queue), CrossStats(8, dense_inputs=queue)
    for x in xs[:2]:
        a.add_batch(x)
    for x in xs[2:]:
        b.add_batch(x)
    c = CrossStats(8, dense_inputs=collections.deque())
    c.load_state(a.merge(b).state())
    assert c.has_target and c.count == one.count == 40
    torch.testing.assert_close(c.cross(), one.cross())
    torch.testing.assert_close(c.hessian(), one.hessian())
    X, Xd = torch.cat([x.reshape(-1, 8) for x in xs]), torch.cat([x.reshape(-1, 8) for x in xds])
    torch.testing.assert_close(one.cross(), (2 / 40 * X.T.double() @ Xd.double()).float())


def test_stats_fall_back_when_the_streams_do_not_match():
    """A routed expert sees other tokens in the dense stream: the layer keeps the plain objective."""
    s = CrossStats(8, dense_inputs=collections.deque([torch.randn(3, 8)]))
    s.add_batch(torch.randn(5, 8))
    assert not s.has_target and s.count == 5
    plain = HessianStats(8)
    s2 = CrossStats(8, dense_inputs=collections.deque())
    x = torch.randn(5, 8)
    s2.add_batch(x)
    plain.add_batch(x)
    assert not s2.has_target and torch.equal(s2.hessian(), plain.hessian())


def _logit_error(dense, model, ids):
    with torch.no_grad():
        ref = dense(ids).logits
        return float((model(ids).logits - ref).norm() / ref.norm())


@pytest.mark.parametrize("method", ["sparsegpt", "admm"])
def test_dense_targets_bring_the_model_closer_to_the_dense_one(method):
    dense = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(3, 200, (16, 32), generator=torch.Generator().manual_seed(0))
    errors, reports = {}, {}
    for dt in ("off", "block", "model"):
        model = copy.deepcopy(dense)
        cfg = hfprune.PruningConfig.from_dict({"method": method, "pattern": "2:4", "dense_targets": dt,
                                               "true_sequential": True})
        reports[dt] = hfprune.prune(model, config=cfg, calibration=ids, batch_size=4, progress=False)
        errors[dt] = _logit_error(dense, model, ids)
        for name, info in reports[dt].layers.items():  # exact 2:4 either way
            assert info["zeros"] == info["numel"] // 2, name
    assert errors["model"] < 0.85 * errors["off"], errors
    assert errors["block"] < errors["off"], errors
    # Block 0's first layers read the model's input, the same tensor in both streams: the plain objective, at no
    # cost. "block" corrects within a block only, so every block's first layers keep it, while "model" moves a
    # later block's first layers towards the dense model. The layers after them move in both.
    q0, q2, o2 = "model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.o_proj"
    for dt in ("off", "block", "model"):
        assert "dense_target_shift" not in reports[dt].layers[q0]
    assert "dense_target_shift" not in reports["block"].layers[q2]
    assert reports["model"].layers[q2]["dense_target_shift"] > 1e-3
    assert reports["block"].layers[o2]["dense_target_shift"] > 1e-3 and "dense_target_shift" not in reports["off"].layers[o2]


@pytest.mark.parametrize("dt", ["block", "model"])
def test_dense_targets_with_moe_experts_fall_back_per_expert(dt):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("mixtral", vocab_size=200, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, 200, (8, 16), generator=torch.Generator().manual_seed(0))
    report = hfprune.prune(model, config=hfprune.PruningConfig.from_dict(
        {"method": "admm", "sparsity": 0.5, "dense_targets": dt}), calibration=ids, batch_size=4, progress=False)
    attn = [v for n, v in report.layers.items() if "self_attn.o_proj" in n]
    experts = [v for n, v in report.layers.items() if "experts" in n]
    assert attn and experts and all("dense_target_shift" in v for v in attn)
    assert not any("dense_target_shift" in v for v in experts)
    assert abs(report.sparsity - 0.5) < 1e-6


def test_output_error_is_measured_against_the_target():
    W = torch.randn(4, 6)
    H = torch.eye(6)
    assert relative_output_error(W, W, H) == 0.0


def test_block_targets_leave_the_pruned_stream_alone_and_are_the_admm_default():
    """"block" records the dense block's inputs without keeping a second stream; admm uses it by default,
    sparsegpt does not; other values are refused before any work."""
    assert hfprune.PruningConfig.from_dict({"method": "admm", "pattern": "2:4"}).dense_targets == "block"
    assert hfprune.PruningConfig.from_dict({"method": "sparsegpt"}).dense_targets == "off"
    with pytest.raises(ValueError, match="dense_targets must be one of 'off', 'block', 'model'"):
        hfprune.PruningConfig.from_dict({"method": "admm", "dense_targets": "dense"})
    with pytest.raises(ValueError, match="add true_sequential=True"):
        hfprune.PruningConfig.from_dict({"method": "sparsegpt", "dense_targets": "block"})
    with pytest.raises(ValueError, match="add true_sequential=True"):
        hfprune.PruningConfig.from_dict({"method": "admm", "dense_targets": "block", "true_sequential": False})
    from hfprune.arch import get_spec
    from hfprune.core.runner import LayerRunner

    model = tiny_model("llama", num_hidden_layers=2)
    runner = LayerRunner(model, get_spec(model), batch_size=2)
    runner.capture(torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(0)))
    before = [h.clone() for h in runner.hidden]
    down = model.model.layers[0].mlp.down_proj
    records = runner.record_dense_inputs(0, {"down": down}, own_stream=True)
    assert runner.dense_hidden is None and all(torch.equal(a, b) for a, b in zip(before, runner.hidden))
    assert len(records["down"]) == 2 and records["down"][0].shape[-1] == down.in_features
