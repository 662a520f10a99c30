"""scripts/gpu_check.py, the prepared device check, in its CPU mode (--device cpu --small)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    rc = _load().main(["--device", "cpu", "--small", "--offload", "--output", str(out)])
    data = json.loads(out.read_text())
    data["_rc"] = rc
    return data


def test_every_method_ran_with_exact_counts(result):
    gc = _load()
    assert result["_rc"] == 0 and result["ok"] is True
    assert set(result["methods"]) == set(gc.METHODS) | {"wanda-50 (offloaded)"}
    for name, row in result["methods"].items():
        assert "error" not in row, (name, row.get("error"))
        assert row["counts_ok"] is True and row["finite"] is True and row["ok"] is True, name
        offloaded = name.endswith("(offloaded)")
        assert row["offloaded"] is offloaded
        # Offloaded: blocks on disk (meta in the model) while the runner onloads one at a time.
        assert ("meta" in row["weights_on"]) if offloaded else row["weights_on"] == ["cpu"]
        for key in ("seconds", "seconds_per_block", "ratio_to_forward", "peak_rss_mb"):
            assert row[key] > 0, (name, key)
        assert row["peak_gpu_mb"] is None  # CPU: no CUDA memory to report
        kind, config = gc.method_config(name.split(" ")[0])
        if kind in ("structured", "depth"):
            continue
        assert row["layers_checked"] == 3 * 7  # 3 blocks x q, k, v, o, gate, up, down
        assert row["sparsity"] == pytest.approx(0.5)
        assert row["nm_ok"] is (True if config.pattern == "2:4" else None)
    assert result["methods"]["depth"]["blocks_after"] == 2  # 3 blocks, 1 removed
    assert result["methods"]["obs-heads-mlp"]["kept"] == result["methods"]["obs-heads-mlp"]["expected"]


def test_report_fields_and_agreement(result):
    for key in ("device", "torch", "transformers", "dtype", "model", "calibration", "forward_seconds", "total_seconds"):
        assert key in result
    assert result["device"] == "cpu" and result["dtype"] == "bfloat16"
    assert result["model"]["blocks"] == 3 and result["model"]["params"] > 0
    assert set(result["agreement"]) == set(_load().METHODS)
    for name, row in result["agreement"].items():
        # Two CPU runs of the same method: the same decisions (the GPU run reports a fraction).
        assert row["agreement"] == 1.0 and row["counts_ok"] is True, name
        assert row["decisions"] > 0


def test_checks_catch_a_bad_mask():
    """The count and N:M checks fail on a layer with one weight too many pruned."""
    import torch

    import hfprune

    gc = _load()
    W = torch.arange(1, 33, dtype=torch.float32).reshape(2, 16)
    W[:, ::2] = 0  # exactly 2:4 and 50 % per row
    ok = gc.check_counts({"w": W}, hfprune.WandaConfig(pattern="2:4"), "wanda")
    assert ok["counts_ok"] and ok["nm_ok"]
    W[0, 1] = 0  # 3 of 4 pruned: still at most 2 kept, but not the exact count
    bad = gc.check_counts({"w": W}, hfprune.WandaConfig(pattern="2:4"), "wanda")
    assert not bad["counts_ok"] and bad["nm_ok"] and bad["bad_count_layers"] == ["w"]
    W[1, 0] = 1.0  # 3 of 4 kept in a group: not 2:4
    assert not gc.check_counts({"w": W}, hfprune.WandaConfig(pattern="2:4"), "wanda")["nm_ok"]
    assert not gc.check_counts({"w": W}, hfprune.WandaConfig(sparsity=0.5), "wanda")["counts_ok"]
    W[1, 1] = 0  # rows of 9 and 8 zeros: the layer total (SparseGPT's exact count) is off by one too
    assert not gc.check_counts({"w": W}, hfprune.SparseGPTConfig(sparsity=0.5), "sparsegpt")["counts_ok"]


def test_cuda_request_without_a_gpu_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cpu --small"):
        _load().main(["--device", "cuda"])
