"""Fault injection: hostile or careless inputs that must never lose data or corrupt an output.

Each case is a real run of the CLI or the library (no mock of the call that fails).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hfprune.cli import main
from hfprune.io import OutputLockedError, output_lock, save_pretrained

from conftest import REPO, tiny_model

TEXT = "Pruning removes weights from a neural network to make it smaller. " * 40


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "base"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join([TEXT] * 5))
    return path


def _prune(model_dir, calib_file, out, *extra):
    return main(["prune", "--model", str(model_dir), "--calibration", str(calib_file), "--nsamples", "4",
                 "--seqlen", "32", "--method", "magnitude", "--output", str(out), *extra])


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_empty_output_never_touches_the_current_folder(model_dir, calib_file, tmp_path, monkeypatch, caplog):
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(work)
    assert _prune(model_dir, calib_file, "", "--overwrite") == 2
    assert "output path is empty" in caplog.text
    assert _prune(model_dir, calib_file, ".", "--overwrite") == 2
    assert "current folder" in caplog.text
    assert (work / "thesis.tex").read_text() == "years of work" and _tree(work) == ["thesis.tex"]


def test_output_equal_to_model_is_refused(model_dir, calib_file, caplog):
    before = _tree(model_dir)
    weights = (model_dir / "model.safetensors").read_bytes()
    assert _prune(model_dir, calib_file, model_dir, "--overwrite") == 2
    assert "would replace the input" in caplog.text and "--output" in caplog.text
    assert _tree(model_dir) == before and (model_dir / "model.safetensors").read_bytes() == weights


def test_output_containing_the_model_is_refused(model_dir, calib_file, tmp_path, caplog):
    (tmp_path / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    assert _prune(model_dir, calib_file, tmp_path, "--overwrite") == 2
    assert "contains the input" in caplog.text
    assert _tree(tmp_path) == before and (tmp_path / "notes.txt").read_text() == "mine"


def test_output_containing_the_calibration_file_is_refused(model_dir, tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    calib = data / "calib.txt"
    calib.write_text("\n".join([TEXT] * 5))
    assert _prune(model_dir, calib, data, "--overwrite") == 2
    assert "contains the input" in caplog.text and calib.exists()


def test_save_pretrained_refuses_the_folder_it_loaded_from(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = _tree(model_dir)
    with pytest.raises(ValueError, match="would replace the input"):
        save_pretrained(model, model_dir, overwrite=True)
    assert _tree(model_dir) == before


def test_overwrite_of_an_earlier_output_still_works(model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    assert _prune(model_dir, calib_file, out) == 0
    assert _prune(model_dir, calib_file, out, "--overwrite") == 0
    assert (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no lock or temp debris


def test_second_run_to_the_same_output_fails_at_once(model_dir, calib_file, tmp_path):
    """Two --low-memory runs into one output: the second (a real CLI process, started while the
    first holds the output) fails with a message; the first finishes with only its own blocks."""
    out = tmp_path / "out"
    results = {}

    def second_run(model, tokenizer):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, "-m", "hfprune.cli", "prune", "--model", str(model_dir),
                               "--calibration", str(calib_file), "--nsamples", "4", "--seqlen", "32",
                               "--method", "wanda", "--sparsity", "0.25", "--low-memory", "--output", str(out)],
                              capture_output=True, text=True, env=env, timeout=300)
        results["rc"], results["stderr"] = proc.returncode, proc.stderr
        return {}

    from hfprune import MagnitudeConfig
    from hfprune.core.engine import resolve_calibration
    from hfprune.workflows.streaming import prune_checkpoint

    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    prune_checkpoint(model_dir, out, MagnitudeConfig(sparsity=0.5), resolve_calibration(ids), low_memory=True,
                     after_prune=second_run)
    assert results["rc"] == 2, results["stderr"]
    assert "Another hfprune run" in results["stderr"] and "choose another --output" in results["stderr"]
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["method"] == "magnitude" and report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_output_lock_is_exclusive_across_processes_and_reentrant(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with output_lock(out):  # the same process may nest (prune holds it, save takes it again)
            pass
        code = ("import sys; from hfprune.io import output_lock\n"
                "try:\n    output_lock(sys.argv[1]).__enter__()\nexcept RuntimeError as e:\n    print(e); sys.exit(3)")
        proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
        assert proc.returncode == 3 and "Another hfprune run" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # lock file removed on release
    with output_lock(out):  # free again
        pass
    assert issubclass(OutputLockedError, RuntimeError)  # the CLI turns it into a message, exit 2
