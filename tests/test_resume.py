"""--resume: a run killed after block k continues from block k+1 and gives the same checkpoint."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hfprune.cli import main
from hfprune.workflows.streaming import work_dir_for

from conftest import REPO, load_sharded, tiny_model

TEXT = "Pruning removes weights from a neural network to make it smaller. " * 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("resume")
    model_dir = root / "base"
    tiny_model("llama", num_hidden_layers=3).save_pretrained(model_dir, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(model_dir)
    calib = root / "calib.txt"
    calib.write_text("\n".join([TEXT] * 5))
    args = ["prune", "--model", str(model_dir), "--calibration", str(calib), "--nsamples", "4", "--seqlen", "32",
            "--method", "sparsegpt", "--sparsity", "0.5", "--batch-size", "1"]
    return root, args


def _tensors(folder):
    return load_sharded(folder)[1]


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_run_resumes_to_same_result(setup, tmp_path):
    root, args = setup
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(args + ["--low-memory", "--output", str(ref)]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HFPRUNE_TEST_EXIT_AFTER_BLOCK": "0", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "hfprune.cli"] + args + ["--low-memory", "--output", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 17, res.stderr[-2000:]
    work = work_dir_for(out)
    state = json.loads((work / "state.json").read_text())
    assert state["next_block"] == 1 and not out.exists()
    assert (work / "model-00001-of-00004.safetensors").exists()
    # Other settings are refused; the same command with --resume continues from block 1.
    assert main(args[:-2] + ["--batch-size", "2", "--low-memory", "--resume", "--output", str(out)]) == 2
    assert main(args + ["--low-memory", "--resume", "--output", str(out)]) == 0
    assert _same(_tensors(out), _tensors(ref))
    r1 = json.loads((out / "pruning_report.json").read_text())
    r2 = json.loads((ref / "pruning_report.json").read_text())
    assert r1["layers"] == r2["layers"] and r1["model_sparsity"] == r2["model_sparsity"]
    assert not work.exists()


def test_in_memory_resume_after_exception(setup, tmp_path, monkeypatch):
    from hfprune.workflows import streaming

    root, args = setup
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(args + ["--resume", "--output", str(ref)]) == 0  # nothing to resume: a fresh run
    original = streaming._Session.block_done

    def interrupt(self, i, *a, **kw):
        original(self, i, *a, **kw)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(streaming._Session, "block_done", interrupt)
    # --resume with nothing saved: a fresh run that saves progress; Ctrl-C is a message and exit 130
    assert main(args + ["--resume", "--output", str(out)]) == 130
    assert json.loads((work_dir_for(out) / "state.json").read_text())["next_block"] == 2
    monkeypatch.setattr(streaming._Session, "block_done", original)
    assert main(args + ["--resume", "--output", str(out)]) == 0
    assert _same(_tensors(out), _tensors(ref))
