"""SparseGPT's default order inside a block is llm-compressor's (and the SparseGPT paper's code).

llm-compressor 0.14's sequential pipeline calibrates every targeted layer of a decoder layer on
one pass of the *dense* layer (its inputs come from the already pruned earlier layers), then
compresses them all, then propagates the pruned outputs. The reference below re-implements that
schedule with plain forward hooks on the whole model (no layer runner, no llm-compressor import)
and hfprune's pure solver; hfprune's default must give the same masks and weights.
(``scripts/bench_sparsegpt_parity.py`` compares against llm-compressor itself; see
``docs/BENCHMARKS.md``.)
"""

from __future__ import annotations

import pytest
import torch

import hfprune
from hfprune.arch import weight_matrix
from hfprune.core.engine import select_targets
from hfprune.solvers.sparsegpt import sparsegpt_prune
from hfprune.stats import HessianStats

from conftest import tiny_model


@torch.no_grad()
def llmc_schedule_sparsegpt(model, ids, sparsity=0.5):
    """Block by block: Hessians of all targeted layers from one forward of the model whose earlier
    blocks are already pruned and whose block ``i`` is still dense; then prune the whole block."""
    config = hfprune.SparseGPTConfig(sparsity=sparsity)
    for block_targets in select_targets(model, config):
        stats, hooks = {}, []
        for name, module in block_targets.items():
            stats[name] = HessianStats(weight_matrix(module).shape[1])
            hooks.append(module.register_forward_hook(lambda m, a, o, s=stats[name]: s.add_batch(a[0])))
        model(input_ids=ids, use_cache=False)
        for h in hooks:
            h.remove()
        for name, module in block_targets.items():
            W = weight_matrix(module)
            new_w, pruned = sparsegpt_prune(W, stats[name].hessian(), sparsity, block_size=config.block_size,
                                            dampening=config.dampening)
            W.copy_(new_w.masked_fill(pruned, 0))
    return model


def _weights(model):
    return {n: weight_matrix(m).clone() for block in select_targets(model, hfprune.SparseGPTConfig())
            for n, m in block.items()}


@pytest.mark.parametrize("model_type", ["llama", "opt", "gpt2", "phi", "gemma2"])
def test_default_order_is_llm_compressors(model_type):
    ids = torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    ref = llmc_schedule_sparsegpt(tiny_model(model_type, seed=1), ids)
    model = tiny_model(model_type, seed=1)
    config = hfprune.SparseGPTConfig(sparsity=0.5)
    assert config.true_sequential is False  # the default
    hfprune.prune(model, config=config, calibration=ids, progress=False)
    got, want = _weights(model), _weights(ref)
    for name in want:  # the same masks (a handful of flips allowed for float summation order) and weights
        assert _mask_agreement(got[name], want[name]) >= 0.999, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-4)
    # The other order is a real option: the same first layers (they read the block's input either way),
    # clearly other masks after them.
    other = tiny_model(model_type, seed=1)
    hfprune.prune(other, config=hfprune.SparseGPTConfig(sparsity=0.5, true_sequential=True), calibration=ids,
                  progress=False)
    ts = _weights(other)
    first = [n for n in want if ".0." in n and n.endswith(("q_proj", "k_proj", "v_proj", "c_attn"))]
    assert first and all(_mask_agreement(ts[n], want[n]) >= 0.999 for n in first)
    flips = lambda a: sum(int(((a[n] == 0) != (want[n] == 0)).sum()) for n in want)  # noqa: E731
    assert flips(ts) > 10 * max(1, flips(got))


def _mask_agreement(a, b) -> float:
    return float(((a == 0) == (b == 0)).float().mean())
