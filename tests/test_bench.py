"""``hfprune bench`` / hfprune.eval.speed on tiny random models: dense, structured and sparse checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import hfprune
from hfprune.cli import main
from hfprune.eval import speed
from hfprune.eval.speed import SpeedConfig, benchmark_speed

from conftest import GraphRecorder, tiny_model

SMALL = ["--prompt-tokens", "8", "--new-tokens", "3", "--batch-sizes", "1", "2", "--repetitions", "2",
         "--warmup", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A dense tiny Llama, its structured (smaller) prune and its 2:4 sparse-format checkpoint."""
    from hfprune.structured import prune_structured

    root = tmp_path_factory.mktemp("bench")
    dense = tiny_model("llama")
    dense.save_pretrained(root / "dense")
    small = tiny_model("llama")
    report = prune_structured(small, heads_ratio=0.5, mlp_ratio=0.5)
    hfprune.save_pretrained(small, root / "structured", report=report)
    sparse = tiny_model("llama")
    rep = hfprune.prune(sparse, None, hfprune.MagnitudeConfig(pattern="2:4"), progress=False)
    hfprune.save_pretrained(sparse, root / "sparse", format="sparse", report=rep)
    return {k: root / k for k in ("dense", "structured", "sparse")}


def test_bench_command_measures_every_kind_of_checkpoint(checkpoints, tmp_path, capsys):
    out = tmp_path / "speed.json"
    argv = ["bench", *(a for k in ("dense", "structured", "sparse") for a in ("--model", str(checkpoints[k]))),
            *SMALL, "--json", "--output", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["device"] == "cpu" and printed["memory_method"].startswith("cpu:")
    dense, structured, sparse = printed["models"]
    assert [m["name"] for m in printed["models"]] == [str(checkpoints[k]) for k in ("dense", "structured", "sparse")]
    for m in printed["models"]:
        for b in (1, 2):
            r = m[f"batch_{b}"]
            assert len(r["runs"]) == 2
            assert r["prefill_s"] > 0 and r["decode_s"] > 0
            totals = [x["prefill_s"] + x["decode_s"] for x in r["runs"]]
            # Median of two runs; the runs are printed rounded to 1e-6 s, so their sum can be off by 2e-6 s.
            assert r["latency_s"] == pytest.approx(sum(totals) / 2, rel=1e-4, abs=2e-6)
            assert r["prefill_tokens_per_s"] == pytest.approx(b * 8 / r["prefill_s"])
            assert r["decode_tokens_per_s"] == pytest.approx(b * 3 / r["decode_s"])
            assert r["peak_memory_bytes"] >= m["parameter_bytes"] > 0
    # structured: physically fewer parameters; sparse: same parameters as dense, half its linear weights zero
    assert structured["parameters"] < dense["parameters"] and structured["parameters_vs_first"] < 1
    assert sparse["parameters"] == dense["parameters"]
    assert sparse["linear_zero_fraction"] == pytest.approx(0.5, abs=0.01) and dense["linear_zero_fraction"] < 0.01
    assert dense["speedup_vs_first"]["batch_1"]["latency"] == pytest.approx(1.0)


def test_models_are_measured_round_robin_and_medians_reported(monkeypatch):
    """Repetition r of every model and batch size runs before repetition r + 1 of any (warm-up first)."""
    a, b = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    calls = []

    def fake_request(model, ids, new_tokens, device):
        calls.append(("a" if model is a else "b", ids.shape[0]))
        t = float(len(calls))
        return t, 10 * t

    monkeypatch.setattr(speed, "_request", fake_request)
    cfg = SpeedConfig(models=["a", "b"], prompt_tokens=4, new_tokens=2, batch_sizes=[1, 3], repetitions=3, warmup=2,
                      device="cpu")
    result = benchmark_speed(cfg, models=[a, b], progress=False)
    one_round = [("a", 1), ("a", 3), ("b", 1), ("b", 3)]
    assert calls == one_round * 5
    # ("b", 3) is call 4, 8, 12, 16, 20; the first two rounds are warm-up
    rb3 = result["models"][1]["batch_3"]
    assert [r["prefill_s"] for r in rb3["runs"]] == [12.0, 16.0, 20.0]
    assert rb3["prefill_s"] == 16.0 and rb3["decode_s"] == 160.0 and rb3["latency_s"] == 176.0
    assert rb3["decode_tokens_per_s"] == pytest.approx(3 * 2 / 160.0)


def test_progress_bar_on_stderr(checkpoints, capsys):
    cfg = SpeedConfig(models=[str(checkpoints["dense"])], prompt_tokens=4, new_tokens=1, batch_sizes=[1],
                      repetitions=1, warmup=0, device="cpu")
    benchmark_speed(cfg, progress=True)
    assert "hfprune bench" in capsys.readouterr().err


@pytest.mark.parametrize("flags,needle", [
    (["--repetitions", "0"], "repetitions must be at least 1"),
    (["--batch-sizes", "0"], "batch_sizes must be positive"),
    (["--prompt-tokens", "250", "--new-tokens", "10"], "exceeds the 256 positions it covers"),
])
def test_bad_settings_fail_before_loading(checkpoints, monkeypatch, caplog, flags, needle):
    def no_load(*a, **k):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(speed, "load_model", no_load)  # the name speed calls
    argv = ["bench", "--model", str(checkpoints["dense"]), *SMALL, *flags]
    assert main(argv) == 2
    assert needle in caplog.text


def test_missing_model_fails_before_any_model_loads(checkpoints, tmp_path, monkeypatch, caplog):
    def no_load(*a, **k):
        raise AssertionError("weights were loaded before every model was checked")

    monkeypatch.setattr(speed, "load_model", no_load)  # the name speed calls
    missing = tmp_path / "not-saved-yet"
    assert main(["bench", "--model", str(checkpoints["dense"]), "--model", str(missing), *SMALL]) == 2
    assert str(missing) in caplog.text and "config.json" in caplog.text
    assert main(["bench", *SMALL]) == 2
    assert "--model A" in caplog.text


def test_speed_config_round_trips_to_json():
    cfg = SpeedConfig(models=["x"], batch_sizes=[1, 8], repetitions=3)
    assert SpeedConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="warmup"):
        SpeedConfig(warmup=-1)


def test_speed_benchmark_builds_no_autograd_graph():
    model = tiny_model("llama")
    cfg = SpeedConfig(models=["tiny"], prompt_tokens=8, new_tokens=3, batch_sizes=[1, 2], repetitions=1, warmup=1,
                      device="cpu")
    with GraphRecorder(model.model.layers[0]) as graph:
        benchmark_speed(cfg, models=[model], progress=False)
    assert graph.grad_modes and not any(graph.grad_modes)
    assert graph.saved_bytes == 0 and torch.is_grad_enabled()
