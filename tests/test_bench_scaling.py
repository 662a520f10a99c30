"""scripts/bench_scaling.py: the parameter counts it divides by and the growth summary it reports."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("bench_scaling", SCRIPTS / "bench_scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("size, billions", [("0.1b", 0.1), ("0.5b", 0.5), ("1.5b", 1.5), ("3b", 3.0)])
def test_sizes_have_the_parameters_they_are_named_for(bench, size, billions):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(bench.bench_memory._config(size))
    counted = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert bench.n_params(size) == counted
    assert counted == pytest.approx(billions * 1e9, rel=0.05)


def test_summary_ratios(bench):
    rows = [{"tool": "hfprune", "method": "wanda", "size": s, "params": p, "prune_ns_per_param": t, "peak_rss_mb": m,
             "prune_s": t * p / 1e9} for s, p, t, m in (("0.1b", 1e8, 50.0, 800), ("0.5b", 5e8, 40.0, 850),
                                                         ("3b", 3e9, 44.0, 935))]
    rows.append({**rows[0], "tool": "llm-compressor", "peak_rss_mb": 1000, "prune_s": 10.0})
    got = bench.summary(rows)["wanda"]
    assert got["largest"] == "3b"
    assert got["time_per_param_ratio_to_0.5b"] == pytest.approx(1.1)
    assert got["peak_rss_ratio_to_0.5b"] == pytest.approx(935 / 850)
    assert got["peak_rss_vs_llmcompressor"] == {"0.1b": 0.8}  # only the sizes both tools ran
    assert got["prune_time_vs_llmcompressor"] == {"0.1b": 0.5}
