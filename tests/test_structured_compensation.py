"""Compensated structured pruning: the least-squares / greedy-OBS solver, the block-by-block engine,
stock reload and the config round trip."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfprune
from hfprune.arch import get_blocks, get_spec, get_submodule
from hfprune.cli.main import build_parser
from hfprune.recipes import build_configs
from hfprune.solvers.lstsq import lstsq_fit, squared_output_error, target_error
from hfprune.solvers.structured import augment_bias, greedy_remove, group_errors
from hfprune.stats import ChannelStats, MomentStats
from hfprune.structured import StructuredConfig

from conftest import tiny_model


def _layer(seed=0, out=12, n=16, tokens=400):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    X[:, 3] = 0.7 * X[:, 0] - 0.2 * X[:, 5]  # one redundant input channel
    W = torch.randn(out, n, generator=g, dtype=torch.float64)
    return W, X


# ---------------------------------------------------------------------------------------------
# Solver
# ---------------------------------------------------------------------------------------------


def test_compensate_is_the_least_squares_solution():
    W, X = _layer()
    keep = torch.tensor([0, 1, 2, 4, 6, 7, 9, 10, 12, 15])
    H = X.T @ X
    fitted = lstsq_fit(W, H, keep=keep, dampening=0.0)
    ref = torch.linalg.lstsq(X[:, keep], X @ W.T).solution.T  # argmin ||X W^T - X_K W_K'^T||
    assert torch.allclose(fitted, ref, atol=1e-8)
    dropped = torch.zeros_like(W)
    dropped[:, keep] = W[:, keep]
    full = torch.zeros_like(W)
    full[:, keep] = fitted
    assert squared_output_error(W, full, H) < squared_output_error(W, dropped, H)
    assert squared_output_error(W, full, H) == pytest.approx(float(((X @ W.T - X[:, keep] @ fitted.T) ** 2).sum()))


def test_bias_column_contains_flap_bias_compensation():
    W, X = _layer(1)
    X = X + 3.0  # inputs with a mean
    b = torch.randn(W.shape[0], dtype=torch.float64)
    Waug = torch.cat([W, b[:, None]], 1)
    Haug = augment_bias(X.T @ X, X.sum(0), X.shape[0])
    keep = torch.tensor([0, 2, 4, 6, 8, 10, 12, 14, 16])  # 16 = the bias column
    fitted = lstsq_fit(Waug, Haug, keep=keep, dampening=0.0)
    Xaug = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
    ref = torch.linalg.lstsq(Xaug[:, keep], Xaug @ Waug.T).solution.T
    assert torch.allclose(fitted, ref, atol=1e-7)
    # FLAP (bias += W_S mean(x_S), kept weights unchanged) is one candidate of the same problem.
    removed = torch.tensor([c for c in range(16) if c not in keep])
    flap = Waug[:, keep].clone()
    flap[:, -1] += W[:, removed] @ X[:, removed].mean(0)

    def err(Wk):
        return float(((Xaug @ Waug.T - Xaug[:, keep] @ Wk.T) ** 2).sum())

    assert err(fitted) <= err(flap) <= err(Waug[:, keep])


def test_greedy_obs_removes_the_redundant_channel_first_and_respects_buckets():
    W, X = _layer(2)
    H = X.T @ X / X.shape[0]
    groups = torch.arange(16)[:, None]
    removed, errors = greedy_remove(W, H, groups, 4, dampening=1e-6)
    assert int(removed[0]) in (0, 3, 5) and errors[0] < 1e-4 * min(errors[1:])
    # The greedy weights equal the least-squares re-fit of the kept columns.
    keep = torch.tensor([c for c in range(16) if c not in removed.tolist()])
    err_greedy = sum(errors)
    fitted = lstsq_fit(W, H, keep=keep, dampening=1e-6)
    full = torch.zeros_like(W)
    full[:, keep] = fitted
    assert squared_output_error(W, full, H) == pytest.approx(err_greedy, rel=1e-4)
    # Buckets: 4 groups of 4 columns, at most one removed per bucket.
    heads = torch.arange(16).view(8, 2)
    removed, _ = greedy_remove(W, H, heads, 4, buckets=torch.arange(8) // 2, per_bucket=1)
    assert sorted((removed // 2).tolist()) == [0, 1, 2, 3]
    errs = group_errors(W, torch.linalg.inv(H), heads)
    assert errs.shape == (8,) and bool((errs > 0).all())


# ---------------------------------------------------------------------------------------------
# Engine on tiny models
# ---------------------------------------------------------------------------------------------

FAMILIES = [("llama", dict(num_attention_heads=8, num_key_value_heads=2), "per_group", 0.5),
            ("llama", dict(num_attention_heads=8, num_key_value_heads=2), "whole_group", 0.5),
            ("qwen2", dict(num_attention_heads=8, num_key_value_heads=2), "per_group", 0.25),
            ("mistral", dict(num_attention_heads=8, num_key_value_heads=2), "whole_group", 0.5),
            ("gpt2", {}, "per_group", 0.25),
            ("opt", {}, "per_group", 0.5)]


def _ids(n=6, length=24, seed=3):
    return torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def _o_outputs(model, ids):
    """Inputs and outputs of block 0's o_proj / down_proj on ``ids``."""
    spec = get_spec(model)
    block = get_blocks(model, spec)[0]
    out = {}
    handles = [get_submodule(block, p).register_forward_hook(lambda m, a, y, key=k: out.setdefault(key, y.detach()))
               for k, p in (("o", spec.o), ("down", spec.down))]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("arch,extra,gqa_mode,heads_ratio", FAMILIES)
def test_compensation_reduces_layer_error_and_reloads(arch, extra, gqa_mode, heads_ratio, tmp_path):
    ids = _ids()
    dense = _o_outputs(tiny_model(arch, **extra), ids)
    errors = {}
    for comp in ("none", "lstsq"):
        model = tiny_model(arch, **extra)
        cfg = StructuredConfig(heads_ratio=heads_ratio, mlp_ratio=0.25, importance="wanda", gqa_mode=gqa_mode,
                               compensation=comp)
        report = hfprune.prune(model, config=cfg, calibration=ids, progress=False)
        pruned = _o_outputs(model, ids)
        errors[comp] = float((pruned["o"] - dense["o"]).pow(2).sum())
        if comp == "lstsq":
            assert report.structured["compensation"] == "lstsq"
            for b in report.structured["blocks"]:  # the solver's own record, on the pruned model's inputs
                assert b["o_error"] <= b["o_error_dropped"] + 1e-9
                assert b["down_error"] <= b["down_error_dropped"] + 1e-9
                assert b["down_error"] < b["down_error_dropped"]
            model.save_pretrained(tmp_path)
            assert report.structured["reload_with"] == ("transformers" if arch in ("llama", "qwen2", "mistral")
                                                        else "hfprune")
            if report.structured["reload_with"] == "transformers":
                again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
                with torch.no_grad():
                    assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)
    # Same heads are kept either way (the importance is the same), so block 0's o_proj sees the
    # same inputs: least squares can only lower its output error.
    assert errors["lstsq"] < errors["none"]


@pytest.mark.parametrize("gqa_mode", ["per_group", "whole_group"])
def test_obs_importance_through_engine_smol_layout(gqa_mode, tmp_path):
    model = tiny_model("llama", hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                       intermediate_size=96)
    ids = _ids()
    report = hfprune.prune(model, config=StructuredConfig(heads_ratio=1 / 3, mlp_ratio=0.25, gqa_mode=gqa_mode),
                           calibration=ids, progress=False)
    assert report.config["importance"] == "obs" and report.structured["compensation"] == "lstsq"
    heads, kv = (6, 3) if gqa_mode == "per_group" else (6, 2)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (heads, kv)
    assert model.config.intermediate_size == 72
    for b in report.structured["blocks"]:
        if gqa_mode == "per_group":  # one query head from every KV group
            assert sorted(h // 3 for h in b["kept_heads"]) == [0, 0, 1, 1, 2, 2]
        assert b["o_error"] < b["o_error_dropped"]
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)


def test_obs_beats_wanda_selection_on_the_calibration_error():
    ids = _ids()
    totals = {}
    for importance in ("wanda", "obs"):
        model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2)
        report = hfprune.prune(model, config=StructuredConfig(mlp_ratio=0.5, importance=importance,
                                                              compensation="lstsq"), calibration=ids, progress=False)
        totals[importance] = report.structured["blocks"][0]["down_error"]  # block 0: the same inputs
    assert totals["obs"] <= totals["wanda"] + 1e-12


def test_bias_refit_with_lstsq_sets_the_config_flag_and_reloads(tmp_path):
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2)
    ids = _ids()
    cfg = StructuredConfig(heads_ratio=0.5, mlp_ratio=0.25, bias_compensation=True)
    report = hfprune.prune(model, config=cfg, calibration=ids, progress=False)
    assert model.config.attention_bias and model.config.mlp_bias
    assert report.structured["bias_compensation"] == {"attention": True, "mlp": True}
    spec = get_spec(model)
    assert float(get_submodule(get_blocks(model, spec)[0], spec.down).bias.detach().abs().sum()) > 0
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)


def test_non_uniform_compensated_widths_reload_with_hfprune(tmp_path):
    from hfprune.structured import AutoPrunedModelForCausalLM

    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2)
    ids = _ids()
    report = hfprune.prune(model, config=StructuredConfig(mlp_ratio=0.4, uniform=False), calibration=ids,
                           progress=False)
    widths = [b["neurons_after"] for b in report.structured["blocks"]]
    assert sum(widths) == 2 * 128 - round(0.4 * 256)
    model.save_pretrained(tmp_path)
    loader = AutoPrunedModelForCausalLM if report.structured["reload_with"] == "hfprune" else AutoModelForCausalLM
    again = loader.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Config, CLI, statistics
# ---------------------------------------------------------------------------------------------


def test_config_round_trip_and_validation():
    cfg = StructuredConfig(heads_ratio=0.25, mlp_ratio=0.3, importance="fluctuation", compensation="lstsq",
                           dampening=0.05, bias_compensation=True, gqa_mode="whole_group", uniform=False)
    again = StructuredConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again == cfg and again.to_dict()["method"] == "structured"
    assert StructuredConfig().importance == "obs" and StructuredConfig().resolved_compensation == "lstsq"
    assert StructuredConfig(importance="magnitude").resolved_compensation == "none"
    with pytest.raises(ValueError, match="compensation"):
        StructuredConfig(compensation="ridge")
    with pytest.raises(ValueError, match="needs compensation"):
        StructuredConfig(importance="obs", compensation="none")
    with pytest.raises(ValueError, match="dampening"):
        StructuredConfig(dampening=-1)
    with pytest.raises(ValueError, match="Unknown key"):
        StructuredConfig.from_dict({"mlp_ratio": 0.2, "damping": 0.1})
    with pytest.raises(ValueError, match="prune_structured|hfprune.prune"):
        from hfprune.structured import prune_structured

        prune_structured(tiny_model("llama"), mlp_ratio=0.5, importance="obs")


def test_cli_and_recipe_keys():
    args = build_parser().parse_args(["prune", "--model", "m", "--output", "o", "--method", "fluctuation",
                                      "--target", "mlp", "--mlp-ratio", "0.3", "--compensation", "none",
                                      "--dampening", "0.1"])
    overrides = {k: getattr(args, k) for k in args.method_keys}
    cfg, _ = build_configs({}, overrides)
    assert isinstance(cfg, StructuredConfig)
    assert (cfg.importance, cfg.compensation, cfg.dampening, cfg.mlp_ratio) == ("fluctuation", "none", 0.1, 0.3)
    with pytest.raises(ValueError, match="structured"):
        build_configs({"method": "wanda", "sparsity": 0.5, "compensation": "lstsq"}, {})


def test_moment_stats_match_channel_stats():
    x = torch.randn(3, 7, 5) + 1.0
    m, c = MomentStats(5), ChannelStats(5)
    for part in x:
        m.add_batch(part)
        c.add_batch(part)
    assert m.count == c.count == 21
    assert torch.allclose(m.mean, c.mean) and torch.allclose(m.var, c.var) and torch.allclose(m.sq_norm, c.sq_norm)
    flat = x.reshape(-1, 5).double()
    assert torch.allclose(m.hessian, flat.T @ flat / 21)
    other = MomentStats(5)
    other.load_state(m.state())
    assert torch.equal(other.merge(m).xtx, 2 * m.xtx)


def test_compensated_engine_errors_before_calibration():
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2)
    with pytest.raises(ValueError, match="heads_ratio"):  # 0.1 of 4 per-group slices rounds to nothing
        hfprune.prune(model, config=StructuredConfig(heads_ratio=0.1), calibration="c4", progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        hfprune.prune(model, config=StructuredConfig(mlp_ratio=0.5), calibration="c4", progress=False)


def test_lstsq_fit_equals_the_old_structured_formulas_and_fits_another_layer():
    W, X = _layer(4)
    keep = torch.tensor([0, 1, 2, 4, 6, 8, 11, 13])
    removed = torch.tensor([c for c in range(16) if c not in keep.tolist()])
    H = X.T @ X / X.shape[0]
    lam = 0.01 * float(H.diagonal().mean())
    Hd = H + lam * torch.eye(16, dtype=H.dtype)
    # The former `compensate`: W'_K = W_K + W_S H_SK (H_KK + lambda I)^-1.
    old = W[:, keep] + W[:, removed] @ H[removed][:, keep] @ torch.linalg.inv(Hd[keep][:, keep])
    assert torch.allclose(lstsq_fit(W, H, keep=keep, dampening=0.01), old, atol=1e-10)
    assert torch.allclose(lstsq_fit(W, H, H, keep, dampening=0.01), old, atol=1e-10)  # G = H: the same fit
    # The former `fit_to_target` on targets T = W X_d: W'_K^T = (H_KK + lambda I)^-1 (C_K + lambda W_K^T), C = G W^T.
    Xd = X + 0.1 * torch.randn(X.shape, generator=torch.Generator().manual_seed(5), dtype=X.dtype)
    G = X.T @ Xd / X.shape[0]
    C = X.T @ (Xd @ W.T) / X.shape[0]
    old = torch.linalg.solve(Hd[keep][:, keep], C[keep] + lam * W[:, keep].T).T
    assert torch.allclose(lstsq_fit(W, H, G, keep, dampening=0.01), old, atol=1e-10)
    # Undamped: the least-squares fit of the dense outputs from the kept pruned inputs.
    fitted = lstsq_fit(W, H, G, keep, dampening=0.0)
    T = Xd @ W.T
    ref = torch.linalg.lstsq(X[:, keep], T).solution.T
    assert torch.allclose(fitted, ref, atol=1e-8)
    err = target_error(fitted, H[keep][:, keep], C[keep], float(T.pow(2).sum()) / X.shape[0])
    assert err == pytest.approx(float((T - X[:, keep] @ fitted.T).pow(2).sum()) / X.shape[0], rel=1e-6)


@pytest.mark.parametrize("arch,extra", [("llama", dict(num_attention_heads=8, num_key_value_heads=2)), ("gpt2", {})])
def test_dense_target_compensation_through_engine(arch, extra):
    ids = _ids()
    model = tiny_model(arch, **extra)
    dense_logits = model(ids).logits.detach()
    cfg = StructuredConfig(heads_ratio=0.5 if arch == "llama" else 0.25, mlp_ratio=0.25,
                           dense_targets="model")
    report = hfprune.prune(model, config=cfg, calibration=ids, progress=False)
    for b in report.structured["blocks"]:
        assert b["down_error"] < b["down_error_dropped"] and b["o_error"] <= b["o_error_dropped"] + 1e-9
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all() and model(ids).logits.shape == dense_logits.shape
    assert StructuredConfig.from_dict(json.loads(cfg.to_json_string())) == cfg
    with pytest.raises(ValueError, match="compensation_target"):
        StructuredConfig(compensation_target="teacher")
    with pytest.raises(ValueError, match="dense_targets"):
        StructuredConfig(dense_targets="dense")


def test_old_names_are_deprecated_aliases():
    with pytest.warns(FutureWarning, match="compensation_target"):
        cfg = StructuredConfig(mlp_ratio=0.25, compensation_target="dense")
    assert cfg.dense_targets == "model" and cfg.compensation_target is None
    with pytest.warns(FutureWarning, match="compensation_target"):
        assert StructuredConfig(compensation_target="pruned").dense_targets == "off"
    with pytest.warns(FutureWarning, match="damp"):
        assert StructuredConfig.from_dict({"mlp_ratio": 0.25, "damp": 0.05}).dampening == 0.05
    assert "damp" not in StructuredConfig(dampening=0.05).to_dict()


def _layer_io(model, ids, key):
    """Per block: the input of o_proj (``key="o"``) or down_proj on ``ids``, ``[tokens, in]`` float64."""
    spec = get_spec(model)
    path = spec.o if key == "o" else spec.down
    seen, handles = {}, []
    for i, block in enumerate(get_blocks(model, spec)):
        hook = lambda m, a, i=i: seen.__setitem__(i, a[0].detach().reshape(-1, a[0].shape[-1]).double())  # noqa: E731
        handles.append(get_submodule(block, path).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return [seen[i] for i in range(len(seen))]


def structured_dense_target_deviation(**dense_kw) -> float:
    """Largest relative deviation (Frobenius) of a structured run fitted to the dense model's outputs
    (``dampening`` 0) from the float64 least-squares fit ``argmin ||W X_d - W'_K X_K||`` computed here from
    the activations: ``X_K`` the pruned model's inputs of the kept columns (the kept heads' outputs and
    neurons do not change when the others are removed), ``X_d`` the dense model's, ``W`` the dense weights."""
    ids = _ids(16, 32)
    dense, model = tiny_model("llama"), tiny_model("llama")
    cfg = StructuredConfig(heads_ratio=0.5, mlp_ratio=0.25, importance="wanda", **dense_kw)
    hfprune.prune(model, config=cfg, calibration=ids, progress=False)
    spec = get_spec(model)
    worst = 0.0
    for key, path in (("o", spec.o), ("down", spec.down)):
        for i, (X, Xd) in enumerate(zip(_layer_io(model, ids, key), _layer_io(dense, ids, key))):
            W = get_submodule(get_blocks(dense, spec)[i], path).weight.detach().double()
            ref = torch.linalg.lstsq(X, Xd @ W.T).solution.T
            got = get_submodule(get_blocks(model, spec)[i], path).weight.detach().double()
            worst = max(worst, float((got - ref).norm() / ref.norm()))
    return worst


def test_structured_dense_targets_are_the_least_squares_fit_to_the_dense_model():
    assert structured_dense_target_deviation(dense_targets="model", dampening=0.0) < 1e-5
    # Fitting to the pruned model's own outputs is another fit: the check can fail.
    assert structured_dense_target_deviation(dense_targets="off", dampening=0.0) > 1e-3


def test_block_dense_targets_refit_down_proj_to_the_dense_block():
    """"block": o_proj reads the block's own input in both runs (the plain fit); down_proj is fitted to the
    dense block's MLP output on the same input, which corrects the attention pruned before it."""
    ids = _ids()
    runs = {}
    for dt in ("off", "block"):
        model = tiny_model("llama")
        cfg = StructuredConfig(heads_ratio=0.5, mlp_ratio=0.25, importance="wanda", dense_targets=dt)
        hfprune.prune(model, config=cfg, calibration=ids, progress=False)
        runs[dt] = get_blocks(model, get_spec(model))[0]
    spec = get_spec(model)
    o = [get_submodule(runs[dt], spec.o).weight for dt in ("off", "block")]
    down = [get_submodule(runs[dt], spec.down).weight for dt in ("off", "block")]
    assert torch.equal(o[0], o[1])
    assert down[0].shape == down[1].shape and not torch.allclose(down[0], down[1], atol=1e-4)
