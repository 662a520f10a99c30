"""Conformance check of one transformers model type: does hfprune prune it correctly end to end?

:func:`check_model_type` builds a tiny random model of the type from its default config
(:func:`hfprune.arch.tiny.tiny_config`), prunes a fresh copy with each pruning config (random-token
calibration) and checks:

* every >= 2-D weight of the decoder blocks that hfprune prunes (linear layers, and every expert's
  slice of fused 3-D expert tensors) is at its target: the exact unstructured count, or N:M in
  every group along its input dimension; routers and norms are excluded by design, and any other
  >= 2-D tensor in the blocks (convolutions, 3-D attention parameters) is listed as left dense;
* the pruned model's logits are finite;
* ``save_pretrained`` and the stock auto class's ``from_pretrained`` give the same class and equal
  logits.

Used by ``scripts/bench_architectures.py`` (every causal-LM type) and by the test suite (a subset).
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from hfprune import methods as _methods  # noqa: F401  (registers the methods PruningConfig.from_dict names)
from hfprune.arch import find_linears, get_blocks, get_spec, moe, weight_matrix
from hfprune.arch.tiny import tiny_config
from hfprune.config import PruningConfig
from hfprune.core.engine import prune
from hfprune.solvers.masks import check_nm, parse_pattern, prune_count

logger = logging.getLogger(__name__)

__all__ = ["check_model_type", "build_tiny_model", "DEFAULT_CASES"]

DEFAULT_CASES: dict[str, dict[str, Any]] = {
    "wanda-50": {"method": "wanda", "sparsity": 0.5},
    "wanda-2of4": {"method": "wanda", "pattern": "2:4"},
}


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


def build_tiny_model(model_type: str, seed: int = 0, auto_class=None):
    """``(model, config)``: a tiny random model of ``model_type`` in eval mode."""
    config = tiny_config(model_type)
    torch.manual_seed(seed)
    model = (auto_class or AutoModelForCausalLM).from_config(config)
    return model.eval(), config


def _calibration_ids(config, n: int = 4, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    vocab = int(getattr(text_config_of(config), "vocab_size", 320) or 320)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, max(4, min(vocab, 300)), (n, seqlen), generator=g)


def text_config_of(config):
    try:
        return config.get_text_config(decoder=True)
    except (AttributeError, TypeError, ValueError):
        return config


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out[0]


def _block_weights(model, spec):
    """``(checked, dense)``: checked ``{name: [out, in] matrix}`` (expert slices included) and the
    names of the other >= 2-D block tensors (left dense: routers, convolutions, ...)."""
    checked, dense = {}, []
    slices = set()
    for i, block in enumerate(get_blocks(model, spec)):
        prefix = f"{spec.layers}.{i}"
        covered = set()
        for rel, module in find_linears(block).items():
            if any(rel == r or rel.startswith(r + ".") for r in spec.routers):
                continue
            checked[f"{prefix}.{rel}"] = weight_matrix(module)
            covered.add(id(module.weight))
        for rel, module in block.named_modules():
            if rel and moe.is_fused_experts(module):
                fused = moe.FusedExperts(module)
                for pname, p in fused.params.items():
                    covered.add(id(p))
                    for e in range(fused.num_experts):
                        checked[f"{prefix}.{rel}.{e}.{pname}"] = fused.matrix(pname, e)
                        slices.add(f"{prefix}.{rel}.{e}.{pname}")
        for name, p in block.named_parameters():
            if p.dim() >= 2 and id(p) not in covered and sum(s > 1 for s in p.shape) >= 2:
                dense.append(f"{prefix}.{name}")
    return checked, dense, slices


def _at_target(W: torch.Tensor, before_zeros: int, case: dict) -> str | None:
    """``None`` when ``W`` is at the target of ``case``, else what is wrong."""
    pattern = parse_pattern(case.get("pattern", "unstructured"))
    zeros = int((W == 0).sum())
    if pattern.is_nm:
        if W.shape[1] % pattern.m:
            return f"input width {W.shape[1]} is not a multiple of {pattern.m}"
        return None if check_nm(W, pattern.n, pattern.m) else f"not {pattern} in every group"
    want = prune_count(W.numel(), float(case.get("sparsity", 0.5)))
    if zeros == want or (before_zeros >= want and zeros == before_zeros):
        return None
    return f"{zeros} zeros, want {want}"


def check_model_type(model_type: str, cases: dict[str, dict] | None = None, *, seed: int = 0,
                     keep_model: bool = False) -> dict[str, Any]:
    """Run the conformance check of ``model_type`` (see the module docstring); a JSON-able dict.

    ``status`` is ``"no_config"`` / ``"no_model"`` / ``"no_forward"`` when the tiny model cannot be
    built or its stock dense forward fails (``reason`` says why), else ``"pass"`` or ``"fail"``.
    """
    cases = cases or DEFAULT_CASES
    out: dict[str, Any] = {"model_type": model_type}
    start = time.perf_counter()
    try:
        config = tiny_config(model_type)
    except Exception as e:  # noqa: BLE001 - any failure is the recorded reason
        return {**out, "status": "no_config", "reason": _err(e)}
    try:
        torch.manual_seed(seed)
        dense = AutoModelForCausalLM.from_config(config).eval()
    except Exception as e:  # noqa: BLE001
        return {**out, "status": "no_model", "reason": _err(e)}
    out["class"] = type(dense).__name__
    out["params"] = sum(p.numel() for p in dense.parameters())
    ids = _calibration_ids(config, seed=seed)
    try:
        ref = _logits(dense, ids[:1])
        if not torch.isfinite(ref).all():
            raise FloatingPointError("non-finite logits")
    except Exception as e:  # noqa: BLE001
        return {**out, "status": "no_forward", "reason": "stock dense forward fails: " + _err(e)}
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    out["runs"] = {}
    ok = True
    for case_name, case in cases.items():
        run: dict[str, Any] = {}
        out["runs"][case_name] = run
        try:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config).eval()
            model.load_state_dict(state)
            spec = get_spec(model)
            run["layers"] = spec.layers
            if spec.experts:
                run["experts"] = list(spec.experts)
            before = {n: int((w == 0).sum()) for n, w in _block_weights(model, spec)[0].items()}
            report = prune(model, config=PruningConfig.from_dict(dict(case)), calibration=ids, progress=False)
            checked, left_dense, slices = _block_weights(model, spec)
            bad = {n: why for n, w in checked.items() if (why := _at_target(w, before.get(n, 0), case))}
            run.update(checked=len(checked), expert_matrices=len(slices),
                       off_target=dict(list(bad.items())[:5]), n_off_target=len(bad), left_dense=left_dense,
                       sparsity=report.sparsity)
            logits = _logits(model, ids[:1])
            run["finite"] = bool(torch.isfinite(logits).all())
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                try:
                    reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
                except ValueError:  # the auto class does not map the saved (text) config: the model's own class
                    reloaded = type(model).from_pretrained(tmp).eval()
                    run["reload_with"] = f"{type(model).__name__}.from_pretrained"
                run["reload_class"] = type(reloaded).__name__
                again = _logits(reloaded, ids[:1])
            run["reload_equal"] = bool(again.shape == logits.shape and torch.equal(again, logits))
            if not run["reload_equal"] and again.shape == logits.shape:
                run["reload_max_diff"] = float((again - logits).abs().max())
            run["ok"] = bool(not bad and run["finite"] and run["reload_equal"] and checked
                             and run["reload_class"] == out["class"])
        except Exception as e:  # noqa: BLE001
            run["error"] = _err(e)
            run["traceback"] = traceback.format_exc(limit=-3)
            run["ok"] = False
        ok = ok and run["ok"]
        if keep_model and run.get("ok"):
            out.setdefault("models", {})[case_name] = model
    out["status"] = "pass" if ok else "fail"
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out
