"""hfprune.io.save_pretrained: formats, model card, atomicity and clear errors on bad input."""

from __future__ import annotations

import errno
import json
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfprune
from hfprune.io import save_pretrained, save_pruned
from hfprune.solvers.masks import check_nm

from conftest import VOCAB, tiny_model


def _pruned(pattern="unstructured", seed=0):
    model = tiny_model("llama", seed=seed)
    report = hfprune.prune(model, config=hfprune.MagnitudeConfig(sparsity=0.5, pattern=pattern), progress=False)
    model.config.pruning_config["base_model"] = "org/tiny-llama"
    return model, report


@pytest.fixture(scope="module")
def pruned_24():
    return _pruned("2:4")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _leftovers(parent: Path, name: str = "out"):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}"))


@pytest.mark.parametrize("fmt,bits,group_size,tol", [
    ("dense", None, None, 0.0),
    ("sparse", None, None, 0.0),
    ("sparse", 8, None, 0.05),
    ("sparse", 4, 32, 0.5),
    ("compressed-tensors", 4, 32, None),
])
def test_formats_round_trip(tmp_path, pruned_24, tiny_tokenizer, random_ids, fmt, bits, group_size, tol):
    model, report = pruned_24
    out = tmp_path / "out"
    ret = save_pretrained(model, out, format=fmt, bits=bits, group_size=group_size, tokenizer=tiny_tokenizer,
                          report=report, eval_results={"perplexity_before": 10.0, "perplexity_after": 12.5})
    assert ret == out and _leftovers(tmp_path) == []
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "README.md", "pruning_report.json", "eval_results.json", "tokenizer.json"} <= names
    assert json.loads((out / "pruning_report.json").read_text())["sparsity"] == pytest.approx(0.5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pruning_config"]["pattern"] == "2:4"
    card = (out / "README.md").read_text()
    assert "base_model: org/tiny-llama" in card and "12.5" in card and "magnitude" in card
    if fmt == "compressed-tensors":  # needs the compressed-tensors package (vLLM) to load: check the layout
        qc = cfg["quantization_config"]
        assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
        return
    assert ("import hfprune" in card) == (fmt == "sparse")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert check_nm(reloaded.model.layers[1].mlp.down_proj.weight, 2, 4)
    diff = (_logits(model, random_ids) - _logits(reloaded, random_ids)).abs().max().item()
    assert diff <= tol


def test_unstructured_sparse_smaller_than_dense(tmp_path):
    model, report = _pruned("unstructured")
    save_pretrained(model, tmp_path / "d", report=report)
    save_pretrained(model, tmp_path / "s", format="sparse", report=report)
    size = {d: sum(p.stat().st_size for p in (tmp_path / d).glob("*.safetensors")) for d in ("d", "s")}
    assert size["s"] < size["d"]
    ids = torch.randint(3, VOCAB, (1, 16))
    assert torch.equal(_logits(model, ids), _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval(), ids))


def test_int4_group_not_dividing_width_reloads_within_step(tmp_path, pruned_24):
    """group_size 48 does not divide the 64/128-wide inputs (last group padded): the loader must use
    the checkpoint's group_size, not ceil(cols / groups)."""
    model = pruned_24[0]
    save_pretrained(model, tmp_path / "q", format="sparse", bits=4, group_size=48)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w, w2 = model.get_submodule(name).weight, reloaded.get_submodule(name).weight
        cols = w.shape[1]
        groups = torch.nn.functional.pad(w.abs(), (0, (-cols) % 48)).view(w.shape[0], -1, 48).amax(-1)
        step = groups.repeat_interleave(48, 1)[:, :cols] / 7
        assert bool(((w - w2).abs() <= step / 2 * (1 + 1e-4) + 1e-12).all()), name


def test_save_pruned_delegates_with_card(tmp_path, pruned_24):
    model, report = pruned_24
    save_pruned(model, tmp_path / "out", report=report, extra_files={"eval_results.json": {"perplexity": 3.25}})
    assert (tmp_path / "out" / "README.md").exists()
    assert "3.25" in (tmp_path / "out" / "README.md").read_text()
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text()) == {"perplexity": 3.25}


def test_no_card_for_unpruned_dense_and_card_off(tmp_path, pruned_24):
    save_pretrained(tiny_model("llama"), tmp_path / "a")
    assert (tmp_path / "a" / "config.json").exists() and not (tmp_path / "a" / "README.md").exists()
    save_pretrained(pruned_24[0], tmp_path / "b", model_card=False)
    assert not (tmp_path / "b" / "README.md").exists()


def test_sparse_without_pruning_state(tmp_path):
    with pytest.raises(ValueError, match=r"prune it first.*format='dense'"):
        save_pretrained(tiny_model("llama"), tmp_path / "out", format="sparse")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs,message", [
    (dict(format="sparse", bits=3), "bits must be None, 4 or 8"),
    (dict(format="sparse", bits=16), "bits must be None, 4 or 8"),
    (dict(format="dense", bits=8), "does not quantize"),
    (dict(format="zip"), "Unknown format"),
    (dict(format="compressed-tensors"), "pass bits=4 or bits=8"),
    (dict(format="compressed-tensors", bits=4, group_size=48), "not a multiple of group_size=48"),
    (dict(format="sparse", group_size=0, bits=4), "positive integer"),
])
def test_bad_arguments(tmp_path, pruned_24, kwargs, message):
    with pytest.raises(ValueError, match=message):
        save_pretrained(pruned_24[0], tmp_path / "sub" / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_dtype(tmp_path):
    model, _ = _pruned()
    model.model.layers[0].mlp.up_proj.weight.data = model.model.layers[0].mlp.up_proj.weight.data.to(
        torch.float8_e4m3fn)
    for fmt in ("dense", "sparse"):
        with pytest.raises(ValueError, match="float32, float16, bfloat16"):
            save_pretrained(model, tmp_path / "out", format=fmt)
    assert list(tmp_path.iterdir()) == []


def test_non_empty_dir_needs_overwrite(tmp_path, pruned_24):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_pretrained(pruned_24[0], out, format="sparse")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # issue 28: --overwrite replaces only a folder hfprune wrote; keep.txt is the user's
    with pytest.raises(FileExistsError, match="hfprune did not write"):
        save_pretrained(pruned_24[0], out, format="sparse", overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    save_pretrained(pruned_24[0], out, format="sparse")          # an empty folder is fine
    save_pretrained(pruned_24[0], out, format="dense", overwrite=True)  # an earlier hfprune output is replaced
    assert (out / "config.json").exists() and (out / "hfprune_manifest.json").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_disk_full_midway_leaves_nothing(tmp_path, monkeypatch, pruned_24, tiny_tokenizer, fmt):
    """The model is written, then the tokenizer writer fails with ENOSPC."""
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tiny_tokenizer), "save_pretrained", full)
    out = tmp_path / "new" / "out"
    with pytest.raises(OSError, match=r"No space left.*free space.*another --output") as info:
        save_pretrained(pruned_24[0], out, format=fmt, tokenizer=tiny_tokenizer)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # neither the temp dir, the final dir nor the created parent


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch, pruned_24):
    import safetensors._safetensors_rust as st

    out = tmp_path / "out"
    save_pretrained(pruned_24[0], out)
    before = sorted(p.name for p in out.iterdir())

    def full(*args, **kwargs):  # what safetensors raises on a full disk
        raise st.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("hfprune.formats.base.save_file", full)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(pruned_24[0], out, format="sparse", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before and _leftovers(tmp_path) == []


def test_real_full_tmpfs(tmp_path, pruned_24):
    """A real ENOSPC on a 64 KiB tmpfs (needs root and mount; skipped otherwise)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", f"hfprune-test-{uuid.uuid4().hex[:8]}", str(mnt)],
                         capture_output=True)
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(OSError, match=r"No space left.*another --output"):
            save_pretrained(pruned_24[0], mnt / "out", format="sparse")
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_saved_sparsity_is_counted_in_the_weights_not_copied_from_the_record(tmp_path, caplog):
    """A pruned model made dense again (a LoRA adapter merged without the masks) must not be saved as 50 % sparse:
    config.json, pruning_report.json and the card state the zeros the saved weights hold, with a warning."""
    model, report = _pruned("unstructured")
    assert report.sparsity == pytest.approx(0.5)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight += 1e-3 * torch.randn_like(module.weight)  # every zero filled in
    with caplog.at_level("WARNING", logger="hfprune"):
        save_pretrained(model, tmp_path / "out", report=report)
    pc = json.loads((tmp_path / "out" / "config.json").read_text())["pruning_config"]
    assert pc["achieved_sparsity"] == 0.0 and pc["achieved_sparsity_when_pruned"] == pytest.approx(0.5)
    assert set(pc["layer_sparsity"].values()) == {0.0}
    saved = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert saved["sparsity"] == 0.0 and all(v["sparsity"] == 0.0 for v in saved["layers"].values())
    card = (tmp_path / "out" / "README.md").read_text()
    numel = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert "| sparsity of the saved weights | 0.00% |" in card and f"| **total** | 14 | {numel:,} | 0.00% |" in card
    assert "50.00% of the weights" not in card and "When the model was pruned it had 50.00%" in card
    assert any("0.00% zeros, not the 50.00% recorded" in r.getMessage() for r in caplog.records)
    # half of the zeros back: the count follows the weights, per layer
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight[: module.weight.shape[0] // 2] = 0
    save_pretrained(model, tmp_path / "again", report=report)
    pc = json.loads((tmp_path / "again" / "config.json").read_text())["pruning_config"]
    assert pc["achieved_sparsity"] == pytest.approx(0.5)
    assert "| sparsity of the saved weights | 50.00% |" in (tmp_path / "again" / "README.md").read_text()


def test_unchanged_pruned_model_keeps_its_recorded_sparsity_without_warning(tmp_path, caplog):
    model, report = _pruned("2:4")
    with caplog.at_level("WARNING", logger="hfprune"):
        save_pretrained(model, tmp_path / "out", report=report)
    pc = json.loads((tmp_path / "out" / "config.json").read_text())["pruning_config"]
    assert pc["achieved_sparsity"] == pytest.approx(report.sparsity) and "achieved_sparsity_when_pruned" not in pc
    assert not [r for r in caplog.records if "recorded when the model was pruned" in r.getMessage()]
