import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from hfprune.cli import main
from hfprune.solvers.masks import check_nm

from conftest import REPO

def _prune_args(model_dir, calib_file, out, *extra):
    return ["prune", "--model", str(model_dir), "--calibration", str(calib_file), "--nsamples", "4",
            "--seqlen", "32", "--output", str(out), *extra]


def test_prune_writes_checkpoint_and_report(model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    assert main(_prune_args(model_dir, calib_file, out, "--method", "wanda", "--pattern", "2:4")) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.5)
    assert report["prune_seconds"] > 0 and report["peak_rss_mb"] > 0
    assert "model.layers.0.mlp.down_proj" in report["layers"]
    assert list(out.glob("*.safetensors")) and (out / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert check_nm(model.model.layers[1].mlp.down_proj.weight, 2, 4)
    assert model.config.pruning_config["command"].startswith("hfprune prune")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_non_empty_output_needs_overwrite(model_dir, calib_file, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(_prune_args(model_dir, calib_file, out, "--method", "magnitude")) == 2
    assert "--overwrite" in caplog.text
    assert (out / "keep.txt").exists()
    # issue 28: --overwrite replaces only an earlier hfprune output, never a folder holding the user's files
    assert main(_prune_args(model_dir, calib_file, out, "--method", "magnitude", "--overwrite")) == 2
    assert "hfprune did not write" in caplog.text and (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    assert main(_prune_args(model_dir, calib_file, out, "--method", "magnitude")) == 0
    assert main(_prune_args(model_dir, calib_file, out, "--method", "magnitude", "--overwrite")) == 0
    assert (out / "config.json").exists()


def test_recipe_with_flag_override(model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    args = _prune_args(model_dir, calib_file, out, "--recipe", str(REPO / "recipes" / "wanda-50.yaml"),
                       "--sparsity", "0.25")
    assert main(args) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["method"] == "wanda" and report["sparsity"] == pytest.approx(0.25, abs=1e-3)
    assert report["calibration"]["nsamples"] == 4


@pytest.mark.parametrize("bad,message", [
    (["--method", "wanda", "--sparsity", "1.2"], "outside [0, 1)"),
    (["--method", "wanda", "--pattern", "2:3"], "multiple of 3"),
    (["--method", "bogus"], "Unknown pruning method"),
])
def test_bad_input_is_a_clear_error(model_dir, calib_file, tmp_path, caplog, bad, message):
    out = tmp_path / "out"
    assert main(_prune_args(model_dir, calib_file, out, *bad)) == 2
    assert message in caplog.text
    assert not out.exists()


def test_missing_calibration_file(model_dir, tmp_path, caplog):
    out = tmp_path / "out"
    assert main(_prune_args(model_dir, tmp_path / "nope.jsonl", out, "--method", "wanda")) == 2
    assert "does not exist" in caplog.text and not out.exists()


def test_interrupted_save_leaves_nothing(model_dir, calib_file, tmp_path, monkeypatch):
    import transformers

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", boom)
    out = tmp_path / "out"
    assert main(_prune_args(model_dir, calib_file, out, "--method", "magnitude")) == 130  # a message, no traceback
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_eval_json_console_script(model_dir, calib_file, tmp_path):
    exe = Path(sys.executable).parent / "hfprune"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "hfprune.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd + ["eval", "--model", str(model_dir), "--dataset", str(calib_file), "--split", "train",
                                "--seqlen", "32", "--max-windows", "3", "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["windows"] == 3 and result["tokens"] == 96 and result["perplexity"] > 1


def test_prune_sparse_format_with_eval(model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    assert main(_prune_args(model_dir, calib_file, out, "--method", "wanda", "--pattern", "2:4", "--format", "sparse",
                            "--bits", "8", "--eval", "--eval-seqlen", "16", "--max-windows", "2")) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["before"]["windows"] == 2 and results["after"]["perplexity"] > 0
    assert "pruned" in (out / "README.md").read_text()
    import hfprune  # noqa: F401  (registers the sparse loader)

    model = AutoModelForCausalLM.from_pretrained(out)
    assert check_nm(model.model.layers[0].mlp.up_proj.weight, 2, 4)


def test_bits_need_a_quantizing_format(model_dir, calib_file, tmp_path, caplog):
    assert main(_prune_args(model_dir, calib_file, tmp_path / "o", "--method", "wanda", "--bits", "4")) == 2
    assert "--format sparse" in caplog.text
