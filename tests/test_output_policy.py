"""Issue 28: one output policy for every command that writes (hfprune/fs.py).

Inputs are never written or deleted; ``--overwrite`` replaces only an empty folder or one hfprune
wrote (its ``hfprune_manifest.json``), and a single output file only when hfprune wrote it; links
are never followed; ``output`` / ``overwrite`` come from the command line, never from a recipe.
Every case runs the real CLI (``main`` in-process, or a subprocess) on real files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from hfprune.cli import main

from conftest import REPO, TEXT, tiny_model


def _prune(model_dir, calib_file, out, *extra):
    return main(["prune", "--model", str(model_dir), "--calibration", str(calib_file), "--nsamples", "4",
                 "--seqlen", "32", "--method", "magnitude", "--output", str(out), *extra])


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


# --- item 2: bench --output never replaces a file it did not write ------------------------------------------

def test_bench_output_refuses_the_models_config_and_needs_overwrite(model_dir, tmp_path, caplog):
    config = model_dir / "config.json"
    before = config.read_bytes()
    small = ["--prompt-tokens", "4", "--new-tokens", "2", "--batch-sizes", "1", "--repetitions", "1", "--warmup", "0",
             "--device", "cpu"]
    # the benchmarked model's own config.json, with and without --overwrite
    assert main(["bench", "--model", str(model_dir), *small, "--output", str(config)]) == 2
    assert main(["bench", "--model", str(model_dir), *small, "--output", str(config), "--overwrite"]) == 2
    assert "inside the input folder" in caplog.text and config.read_bytes() == before
    # any other existing file: refused without --overwrite; with it only when hfprune wrote the file
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    assert main(["bench", "--model", str(model_dir), *small, "--output", str(notes)]) == 2
    assert main(["bench", "--model", str(model_dir), *small, "--output", str(notes), "--overwrite"]) == 2
    assert "hfprune did not write it" in caplog.text and notes.read_text() == '{"mine": 1}'
    result = tmp_path / "speed.json"
    assert main(["bench", "--model", str(model_dir), *small, "--output", str(result)]) == 0
    assert json.loads(result.read_text())["written_by"] == "hfprune"
    assert main(["bench", "--model", str(model_dir), *small, "--output", str(result)]) == 2
    assert main(["bench", "--model", str(model_dir), *small, "--output", str(result), "--overwrite"]) == 0


# --- item 3: a recipe cannot choose the output, nor --overwrite ---------------------------------------------

def test_recover_recipe_cannot_set_output_or_overwrite(model_dir, calib_file, tmp_path, caplog):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    recipe = tmp_path / "shared.yaml"
    recipe.write_text(yaml.safe_dump({"output": str(victim), "overwrite": True, "max_steps": 1, "seqlen": 16,
                                      "per_device_train_batch_size": 1, "dataset": str(calib_file),
                                      "eval_dataset": "none"}))
    assert main(["recover", "--recipe", str(recipe), "--model", str(model_dir)]) == 2
    assert "command line only" in caplog.text
    assert _snapshot(victim) == {"thesis.tex": b"years of work"}


# --- item 4: flow and recover never delete their own recipe / calibration / dataset -------------------------

def test_flow_overwrite_keeps_its_recipe_and_calibration_inside_output(model_dir, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    calib = out / "calib.txt"
    calib.write_text("\n".join([TEXT] * 5))
    recipe = out / "flow.yaml"
    recipe.write_text(yaml.safe_dump({"prune": {"method": "magnitude", "sparsity": 0.5,
                                                "calibration": {"dataset": str(calib), "nsamples": 2, "seqlen": 16}}}))
    before = _snapshot(out)
    assert main(["flow", "--recipe", str(recipe), "--model", str(model_dir), "--output", str(out), "--overwrite"]) == 2
    assert "contains the input" in caplog.text
    assert _snapshot(out) == before


def test_recover_overwrite_keeps_its_dataset_inside_output(model_dir, calib_file, tmp_path, caplog):
    out = tmp_path / "out"
    assert _prune(model_dir, calib_file, out) == 0       # an earlier hfprune output ...
    data = out / "train.txt"                               # ... where the user then put the training text
    data.write_text("\n".join([TEXT] * 5))
    argv = ["recover", "--model", str(model_dir), "--dataset", str(data), "--eval-dataset", "none", "--max-steps", "1",
            "--seqlen", "16", "--batch-size", "1", "--output", str(out), "--overwrite"]
    assert main(argv) == 2
    assert "contains the input" in caplog.text and data.read_text() == "\n".join([TEXT] * 5)


# --- item 5: eval --output never replaces the evaluated model's files ---------------------------------------

def test_eval_output_refuses_the_models_weights(model_dir, calib_file, caplog):
    weights = model_dir / "model.safetensors"
    before = weights.read_bytes()
    rc = main(["eval", "--model", str(model_dir), "--dataset", str(calib_file), "--seqlen", "32", "--max-windows", "1",
               "--output", str(weights), "--overwrite"])
    assert rc == 2 and "inside the input folder" in caplog.text
    assert weights.read_bytes() == before


def test_eval_output_replaces_only_its_own_result(model_dir, calib_file, tmp_path, caplog):
    argv = ["eval", "--model", str(model_dir), "--dataset", str(calib_file), "--seqlen", "32", "--max-windows", "1"]
    mine = tmp_path / "mine.json"
    mine.write_text('{"a": 1}')
    assert main([*argv, "--output", str(mine), "--overwrite"]) == 2 and mine.read_text() == '{"a": 1}'
    result = tmp_path / "ppl.json"
    assert main([*argv, "--output", str(result)]) == 0
    assert main([*argv, "--output", str(result), "--overwrite"]) == 0
    assert json.loads(result.read_text())["written_by"] == "hfprune"


def test_zeroshot_output_follows_the_same_rule(model_dir, tmp_path, caplog):
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps({"prompt": "The sky is", "choices": [" blue", " green"], "label": 0})
                               for _ in range(2)) + "\n")
    argv = ["zeroshot", "--model", str(model_dir), "--task", str(items), "--batch-size", "2"]
    assert main([*argv, "--output", str(items), "--overwrite"]) == 2    # its own task file
    assert "is the input" in caplog.text and len(items.read_text().splitlines()) == 2
    result = tmp_path / "zs.json"
    assert main([*argv, "--output", str(result)]) == 0
    assert json.loads(result.read_text())["n"] == 2
    assert main([*argv, "--output", str(result)]) == 2
    assert main([*argv, "--output", str(result), "--overwrite"]) == 0


# --- item 6: --overwrite only on hfprune's own folders; links never followed ---------------------------------

def test_overwrite_refuses_a_folder_hfprune_did_not_write(model_dir, calib_file, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert _prune(model_dir, calib_file, out, "--overwrite") == 2
    assert "hfprune did not write it" in caplog.text
    assert _snapshot(out) == {"thesis.tex": b"years of work"}


def test_overwrite_refuses_an_hfprune_output_holding_a_users_file(model_dir, calib_file, tmp_path, caplog):
    out = tmp_path / "out"
    assert _prune(model_dir, calib_file, out) == 0
    manifest = json.loads((out / "hfprune_manifest.json").read_text())
    assert manifest["written_by"] == "hfprune" and "config.json" in manifest["files"]
    assert set(manifest["files"]) == {str(p.relative_to(out)) for p in out.rglob("*")} - {"hfprune_manifest.json"}
    (out / "notes").mkdir()
    (out / "notes" / "thesis.tex").write_text("years of work")
    assert _prune(model_dir, calib_file, out, "--overwrite") == 2
    assert "notes/thesis.tex" in caplog.text and (out / "notes" / "thesis.tex").read_text() == "years of work"
    (out / "notes" / "thesis.tex").unlink()
    (out / "notes").rmdir()
    assert _prune(model_dir, calib_file, out, "--overwrite") == 0  # the earlier output alone: replaced


def test_symlink_outputs_are_refused_and_never_followed(model_dir, calib_file, tmp_path, caplog):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert _prune(model_dir, calib_file, link, "--overwrite") == 2
    assert "symbolic link" in caplog.text and _snapshot(target) == {"thesis.tex": b"years of work"}
    assert link.is_symlink()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere" / "deep")
    assert _prune(model_dir, calib_file, dangling) == 2
    assert not (tmp_path / "nowhere").exists()
    under = tmp_path / "dangling" / "out"   # a dangling link above the output
    assert _prune(model_dir, calib_file, under) == 2
    assert not (tmp_path / "nowhere").exists()
    # single output files too: eval --output through a link
    victim = tmp_path / "victim.json"
    victim.write_text('{"written_by": "hfprune"}')
    flink = tmp_path / "result.json"
    flink.symlink_to(victim)
    rc = main(["eval", "--model", str(model_dir), "--dataset", str(calib_file), "--seqlen", "32", "--max-windows", "1",
               "--output", str(flink), "--overwrite"])
    assert rc == 2 and victim.read_text() == '{"written_by": "hfprune"}' and flink.is_symlink()


def test_sweep_refuses_a_users_folder_and_resumes_its_own(tmp_path, caplog):
    from hfprune.workflows.sweep import sweep

    out = tmp_path / "results"
    out.mkdir()
    (out / "results.csv").write_text("my own results")
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(methods="magnitude", sparsities=[0.5], calibration=ids, eval_dataset=ids.reshape(1, -1), eval_seqlen=16,
              plot=False, progress=False)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="hfprune did not write"):
            sweep(tiny_model("llama"), output_dir=out, overwrite=overwrite, **kw)
    assert (out / "results.csv").read_text() == "my own results"
    fresh = tmp_path / "fresh"
    sweep(tiny_model("llama"), output_dir=fresh, **kw)
    assert json.loads((fresh / "hfprune_manifest.json").read_text())["kind"] == "sweep"
    sweep(tiny_model("llama"), output_dir=fresh, **kw)                  # resumed, no --overwrite needed
    sweep(tiny_model("llama"), output_dir=fresh, overwrite=True, **kw)  # replaced


# --- the CLI as a real process ----------------------------------------------------------------------------------

def test_overwrite_refusal_in_a_real_process(model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    proc = subprocess.run([sys.executable, "-m", "hfprune.cli", "prune", "--model", str(model_dir), "--calibration",
                           str(calib_file), "--nsamples", "4", "--seqlen", "32", "--method", "magnitude",
                           "--output", str(out), "--overwrite"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "hfprune did not write it" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "thesis.tex").read_text() == "years of work"


def test_sweep_never_writes_into_a_checkpoint_folder(model_dir, calib_file, tmp_path):
    from hfprune.workflows.sweep import sweep

    out = tmp_path / "out"
    assert _prune(model_dir, calib_file, out) == 0
    before = _snapshot(out)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="holds hfprune checkpoint output"):
            sweep(tiny_model("llama"), methods="magnitude", sparsities=[0.5], calibration=ids,
                  eval_dataset=ids.reshape(1, -1), eval_seqlen=16, plot=False, progress=False, output_dir=out,
                  overwrite=overwrite)
    assert _snapshot(out) == before
