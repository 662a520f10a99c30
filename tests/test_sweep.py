import argparse
import json
import math

import pytest
import torch

from hfprune.workflows import sweep as sweep_mod
from hfprune.cli.sweep import add_cli
from hfprune.workflows.sweep import format_table, read_jsonl, search, sweep

from conftest import VOCAB, tiny_model

TEXT = ("Pruning removes weights from a neural network to make it smaller and faster. "
        "The quick brown fox jumps over the lazy dog. ") * 20
EVAL = [TEXT] * 2


@pytest.fixture
def calib_ids():
    return torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def loader(tiny_tokenizer):
    return lambda: (tiny_model("llama"), tiny_tokenizer)


def _sweep(loader, out, calib, **kw):
    args = dict(calibration=calib, eval_dataset=EVAL, eval_seqlen=32, max_windows=2, output_dir=out,
                progress=False)
    args.update(kw)
    return sweep(loader, **args)


def test_sweep_writes_files_runs_nm_once_and_resumes(loader, calib_ids, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    calls = []
    real_run = sweep_mod._PointRunner.run

    def counting_run(self, method, pattern, s):
        calls.append((method, pattern, s))
        return real_run(self, method, pattern, s)

    monkeypatch.setattr(sweep_mod._PointRunner, "run", counting_run)
    rows = _sweep(loader, out, calib_ids, methods="magnitude,wanda", sparsities=[0.3, 0.6],
                  patterns=["unstructured", "2:4"])
    assert [(r["method"], r["pattern"], r["sparsity"]) for r in rows] == [
        ("dense", "dense", 0.0),
        ("magnitude", "unstructured", 0.3), ("magnitude", "unstructured", 0.6), ("magnitude", "2:4", 0.5),
        ("wanda", "unstructured", 0.3), ("wanda", "unstructured", 0.6), ("wanda", "2:4", 0.5),
    ]
    assert len(calls) == 7
    for r in rows:
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert r["achieved_sparsity"] == pytest.approx(r["sparsity"], abs=0.01)
    assert rows[0]["ppl_increase"] == 0.0
    assert rows[2]["ppl_increase"] != 0  # a random tiny model: pruning changes ppl, either way
    assert len(read_jsonl(out / "results.jsonl")) == 7
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,pattern,sparsity") and len(csv_lines) == 8
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == 7 and data["settings"]["eval_seqlen"] == 32
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))
    assert "| wanda | 2:4 | 0.50 |" in format_table(rows)

    # A rerun skips every finished point; an interrupted one finishes only what is missing.
    calls.clear()
    again = _sweep(loader, out, calib_ids, methods="magnitude,wanda", sparsities=[0.3, 0.6],
                   patterns=["unstructured", "2:4"], plot=False)
    assert calls == [] and [r["perplexity"] for r in again] == [r["perplexity"] for r in rows]
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # cut-off last write
    again = _sweep(loader, out, calib_ids, methods="magnitude,wanda", sparsities=[0.3, 0.6],
                   patterns=["unstructured", "2:4"], plot=False)
    assert calls == [("wanda", "2:4", 0.5)]
    assert again[-1]["perplexity"] == pytest.approx(rows[-1]["perplexity"], rel=1e-5)

    # Other settings in the same folder: refused unless overwrite.
    with pytest.raises(ValueError, match="overwrite"):
        _sweep(loader, out, calib_ids, methods="magnitude", sparsities=[0.3], max_windows=1, plot=False)
    calls.clear()
    rows = _sweep(loader, out, calib_ids, methods="magnitude", sparsities=[0.3], max_windows=1, overwrite=True,
                  plot=False)
    assert len(calls) == 2 and len(read_jsonl(out / "results.jsonl")) == 2


def test_sweep_restores_dense_weights_and_draws_calibration_once(tiny_tokenizer, monkeypatch):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    draws = []
    real = sweep_mod.get_calibration_ids

    def counting(*args, **kwargs):
        draws.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_mod, "get_calibration_ids", counting)
    rows = sweep(model, ["wanda"], [0.4, 0.6], tokenizer=tiny_tokenizer, calibration=[TEXT], nsamples=2, seqlen=16,
                 eval_dataset=EVAL, eval_seqlen=32, max_windows=1, progress=False)
    assert len(rows) == 3 and len(draws) == 1
    assert rows[1]["perplexity"] != rows[2]["perplexity"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model.config, "pruning_config")


def test_sweep_rejects_bad_grid(loader, calib_ids):
    with pytest.raises(ValueError, match="Unknown method"):
        sweep(loader, ["nope"], [0.5], calibration=calib_ids, eval_dataset=EVAL, progress=False)
    with pytest.raises(ValueError, match="sparsities"):
        sweep(loader, ["magnitude"], [1.5], calibration=calib_ids, eval_dataset=EVAL, progress=False)


def _monotone(threshold):
    calls = []

    def fn(s):
        calls.append(s)
        return 10.0 + s if s <= threshold else 20.0 + 100 * (s - threshold)  # increasing, jumps at threshold

    return fn, calls


@pytest.mark.parametrize("threshold", [0.13, 0.55, 0.83])
def test_search_finds_highest_sparsity_within_budget(threshold):
    fn, calls = _monotone(threshold)
    result = search(method="wanda", max_ppl=11.0, evaluate_fn=fn, tol=0.02, progress=False)
    assert threshold - 0.02 <= result["sparsity"] <= threshold
    assert result["converged"] and result["first_over_budget"] - result["sparsity"] <= 0.02
    probes = result["probes"]
    assert [p["sparsity"] for p in probes[:2]] == [0.0, 0.3]
    if threshold >= 0.3:
        assert probes[2]["sparsity"] == 0.7
    assert len(probes) == len(calls) == result["evaluations"]
    for p in probes:
        assert p["within_budget"] == (fn(p["sparsity"]) <= 11.0)
    assert result["perplexity"] == fn(result["sparsity"])


def test_search_relative_budget_smooth_curve(tmp_path):
    def fn(s):
        return 20.0 * math.exp(2.0 * s ** 2)  # +10 % at s = sqrt(ln(1.1) / 2) = 0.218

    out = tmp_path / "search"
    result = search(method="magnitude", max_ppl_increase=0.1, evaluate_fn=fn, tol=0.01, output_dir=out,
                    progress=False)
    edge = math.sqrt(math.log(1.1) / 2)
    assert edge - 0.01 <= result["sparsity"] <= edge
    assert result["budget_ppl"] == pytest.approx(22.0) and result["dense_perplexity"] == 20.0
    assert len(read_jsonl(out / "search.jsonl")) == len(result["probes"])
    saved = json.loads((out / "search.json").read_text())
    assert saved["sparsity"] == result["sparsity"] and len(saved["probes"]) == len(result["probes"])

    # Probes already on disk are reused, so a rerun (even with another budget) costs no new evaluation
    # for the sparsities it visits again.
    calls = []

    def counting(s):
        calls.append(s)
        return fn(s)

    counting.__qualname__ = fn.__qualname__
    again = search(method="magnitude", max_ppl_increase=0.1, evaluate_fn=counting, tol=0.01, output_dir=out,
                   progress=False)
    assert calls == [] and again["sparsity"] == result["sparsity"] and again["evaluations"] == 0


def test_search_edges_and_validation():
    everything_ok = search(method="wanda", max_ppl=100, evaluate_fn=lambda s: 5.0, progress=False)
    assert everything_ok["sparsity"] == 0.95 and everything_ok["converged"]
    hopeless = search(method="wanda", max_ppl=1.0, evaluate_fn=lambda s: 5.0, progress=False)
    assert hopeless["sparsity"] is None and len(hopeless["probes"]) == 1
    with pytest.raises(ValueError, match="exactly one budget"):
        search(method="wanda", evaluate_fn=lambda s: 5.0)
    with pytest.raises(ValueError, match="exactly one budget"):
        search(method="wanda", max_ppl=3, max_ppl_increase=0.1, evaluate_fn=lambda s: 5.0)
    with pytest.raises(ValueError, match="unstructured"):
        search(method="wanda", max_ppl=3, pattern="2:4", evaluate_fn=lambda s: 5.0)


def test_search_on_tiny_model(loader, calib_ids):
    result = search(loader, method="magnitude", max_ppl_increase=0.05, tol=0.2, calibration=calib_ids,
                    eval_dataset=EVAL, eval_seqlen=32, max_windows=1, progress=False)
    assert result["probes"][0]["sparsity"] == 0.0
    assert result["sparsity"] is not None and 0.0 <= result["sparsity"] <= 0.95
    best = next(p for p in result["probes"] if p["sparsity"] == result["sparsity"])
    assert best["within_budget"] and best["perplexity"] <= result["budget_ppl"]


def test_cli_sweep_and_search(tmp_path, tiny_tokenizer, capsys):
    model_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    text_file = tmp_path / "text.txt"
    text_file.write_text("\n".join([TEXT] * 3))
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    common = ["--model", str(model_dir), "--calibration", str(text_file), "--nsamples", "2", "--seqlen", "16",
              "--eval-dataset", str(text_file), "--eval-seqlen", "32", "--max-windows", "1"]
    args = parser.parse_args(["sweep", *common, "--methods", "wanda", "--sparsities", "0.5", "--patterns",
                              "unstructured,2:4", "--output", str(tmp_path / "sw"), "--no-plot"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| dense | dense |" in printed and "| wanda | 2:4 | 0.50 |" in printed
    assert len(read_jsonl(tmp_path / "sw" / "results.jsonl")) == 3

    args = parser.parse_args(["search", *common, "--method", "magnitude", "--max-ppl-increase", "1000",
                              "--tol", "0.3", "--output", str(tmp_path / "se"), "--json"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sparsity"] == 0.95 and (tmp_path / "se" / "search.json").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["search", *common, "--output", "x"])  # a budget is required
