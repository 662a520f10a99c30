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

from conftest import REPO, TEXT, accelerate_launch, tiny_model

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


# --- item 8: extra_files names stay inside the output ------------------------------------------

@pytest.mark.parametrize("name", ["../../x.json", "/tmp/hfprune-abs.json", "sub/x.json", "..", ""])
def test_extra_files_outside_the_output_are_refused(tmp_path, name):
    model = tiny_model("llama")
    out = tmp_path / "deep" / "out"
    with pytest.raises(ValueError, match="plain file name"):
        save_pretrained(model, out, extra_files={name: {"a": 1}})
    assert list(tmp_path.iterdir()) == [] and not os.path.exists("/tmp/hfprune-abs.json")


# --- item 9: what can be checked is checked before the first block ------------------------------

def _fails_before_pruning(caplog, argv_result, needle):
    assert argv_result == 2
    assert needle in caplog.text
    assert "Calibrating on" not in caplog.text  # no calibration pass started


def test_compressed_tensors_without_bits_fails_first(model_dir, calib_file, tmp_path, caplog):
    rc = _prune(model_dir, calib_file, tmp_path / "out", "--format", "compressed-tensors")
    _fails_before_pruning(caplog, rc, "pass bits=4 or bits=8")
    assert not (tmp_path / "out").exists()


def test_group_size_that_does_not_fit_fails_first(model_dir, calib_file, tmp_path, caplog):
    rc = _prune(model_dir, calib_file, tmp_path / "out", "--format", "compressed-tensors", "--bits", "4",
                "--group-size", "48")
    _fails_before_pruning(caplog, rc, "not a multiple of group_size=48")


def _mount_tmpfs(where, *options):
    where.mkdir(exist_ok=True)
    opts = ",".join(("size=4m",) + options)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                                           capture_output=True).returncode:
        pytest.skip("needs root and mount to make a real mount point")


def test_read_only_output_fails_first(model_dir, calib_file, tmp_path, caplog):
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "ro")
    try:
        rc = _prune(model_dir, calib_file, ro / "out")
        _fails_before_pruning(caplog, rc, "not writable")
    finally:
        subprocess.run(["umount", str(ro)], check=False)


# --- item 10: an empty mount point (a container volume) as the output ---------------------------

def test_empty_mount_point_as_output(model_dir, calib_file, tmp_path):
    vol = tmp_path / "vol"
    _mount_tmpfs(vol)
    try:
        assert _prune(model_dir, calib_file, vol) == 0
        assert (vol / "config.json").exists() and (vol / "model.safetensors").exists()
        assert not [p for p in vol.iterdir() if p.name.startswith(".")]
        assert _prune(model_dir, calib_file, vol, "--overwrite") == 0  # replace in place, on the volume's disk
        assert (vol / "config.json").exists() and not [p for p in vol.iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", str(vol)], check=False)


# --- item 17/19: Ctrl-C and SIGTERM: a message, no traceback, no debris -------------------------

def _cli_process(model_dir, calib_file, out, env_extra=None):
    import signal

    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    # A test run started in the background of a non-interactive shell inherits SIGINT ignored, and Python
    # then installs no Ctrl-C handler in the child: give the child the default, as a terminal would.
    return subprocess.Popen([sys.executable, "-m", "hfprune.cli", "prune", "--model", str(model_dir),
                             "--calibration", str(calib_file), "--nsamples", "64", "--seqlen", "64",
                             "--method", "sparsegpt", "--sparsity", "0.5", "--output", str(out)],
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("sig,code", [(2, 130), (15, 143)])
def test_interrupt_gives_a_message_and_leaves_nothing(model_dir, calib_file, tmp_path, sig, code):
    import time

    out = tmp_path / "out"
    proc = _cli_process(model_dir, calib_file, out)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until the run is under way (its lock file exists)
        if (tmp_path / ".out.hfprune-lock").exists():
            break
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err
    assert "Traceback" not in err and ("Interrupted" in err or "Terminated" in err)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


_KILL_DURING_SAVE = """
import os, signal, sys
import torch
from transformers import AutoModelForCausalLM
from hfprune.io import save_pretrained
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
mode = sys.argv[3]
if mode == "write":          # killed while the new checkpoint is being written
    class Tok:
        def save_pretrained(self, path):
            os.kill(os.getpid(), signal.SIGKILL)
    save_pretrained(model, sys.argv[2], tokenizer=Tok(), overwrite=True)
else:                        # killed between moving the old copy aside and moving the new one in
    real, calls = os.replace, []
    def replace(a, b):
        calls.append(a)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(a, b)
    os.replace = replace
    save_pretrained(model, sys.argv[2], overwrite=True)
"""


@pytest.mark.parametrize("mode", ["write", "swap"])
def test_sigkill_debris_is_cleaned_and_the_old_copy_restored(model_dir, calib_file, tmp_path, mode, caplog):
    out = tmp_path / "out"
    assert _prune(model_dir, calib_file, out) == 0
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, str(model_dir), str(out), mode],
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, timeout=300)
    assert proc.returncode == -9
    debris = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert debris  # the killed run left a temporary folder (write) or the old copy aside (swap)
    if mode == "swap":
        assert not out.exists()
    # the next run to that output cleans up (and restores the old copy first when it was moved aside)
    assert _prune(model_dir, calib_file, out, "--overwrite") == 0
    assert (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []
    if mode == "swap":
        assert "Restoring" in caplog.text


# --- item 20: folder modes -----------------------------------------------------------------------

def test_output_folder_mode_is_like_mkdir_and_kept_on_overwrite(model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert _prune(model_dir, calib_file, out) == 0
        assert (out.stat().st_mode & 0o777) == 0o755
        os.chmod(out, 0o750)
        assert _prune(model_dir, calib_file, out, "--overwrite") == 0
        assert (out.stat().st_mode & 0o777) == 0o750
    finally:
        os.umask(old)


# --- item 15: a huge one-line calibration file is not tokenized whole ----------------------------

def test_huge_single_line_calibration_file_is_cheap(model_dir, tmp_path):
    import resource
    import time

    from hfprune import load_tokenizer
    from hfprune.core.calibration import get_calibration_ids
    from hfprune.config import CalibrationConfig

    big = tmp_path / "big.txt"
    big.write_text(("pruning words " * 3_500_000) + "\n")  # 49 MB, one line
    tok = load_tokenizer(model_dir)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    ids = get_calibration_ids(CalibrationConfig(dataset=str(big), nsamples=4, seqlen=64), tok)
    assert ids.shape == (4, 64)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grown_mb < 800, grown_mb  # reading the file is ~100 MB of Python strings; tokenizing it whole took GBs
    assert time.perf_counter() - start < 60


# --- item 16: calibrating on the evaluation text needs to be asked for ---------------------------

def test_calibrating_on_the_evaluation_text_is_refused_unless_asked(model_dir, tmp_path, caplog):
    args = ["prune", "--model", str(model_dir), "--calibration", "wikitext2", "--nsamples", "2", "--seqlen", "32",
            "--method", "wanda", "--output", str(tmp_path / "out")]
    assert main(args) == 2
    assert "only the test split" in caplog.text and "--split test" in caplog.text
    assert not (tmp_path / "out").exists()
    assert main(args + ["--split", "test"]) == 0


# --- item 17: input errors are messages, not tracebacks ------------------------------------------

def test_invalid_targets_regex_fails_before_the_model_loads(model_dir, calib_file, tmp_path, caplog):
    assert _prune(model_dir, calib_file, tmp_path / "o", "--targets", "mlp.(") == 2
    assert "targets regex 'mlp.('" in caplog.text and "Loading" not in caplog.text


@pytest.mark.parametrize("text,needle", [
    ("method: [wanda", "not valid YAML"),
    ("method: !!python/object/apply:os.system ['echo owned']", "YAML tag that is not allowed"),
    ("method: wanda\nowl_m: abc", "`owl_m` must be float"),
    ("method: wanda\ntargets: 5", "targets"),
])
def test_bad_recipes_are_messages(model_dir, calib_file, tmp_path, caplog, capsys, text, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert _prune(model_dir, calib_file, tmp_path / "o", "--recipe", str(recipe)) == 2
    assert needle in caplog.text and "owned" not in capsys.readouterr().out


# --- item 5: a config that names more layers than the checkpoint holds ---------------------------

def test_missing_block_in_the_checkpoint_is_refused(model_dir, calib_file, tmp_path, caplog):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert _prune(model_dir, calib_file, tmp_path / "out") == 2
    assert "lacks" in caplog.text and "model.layers.2." in caplog.text
    assert not (tmp_path / "out").exists()


# --- item 17: a truncated safetensors file ------------------------------------------------------

def test_truncated_weights_are_a_message(model_dir, calib_file, tmp_path, caplog):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert _prune(model_dir, calib_file, tmp_path / "out") == 2
    assert "cannot be read" in caplog.text and "Traceback" not in caplog.text


# --- item 12: every command loads every checkpoint hfprune writes --------------------------------

def test_eval_and_recover_load_non_uniform_structured_outputs(model_dir, calib_file, tmp_path):
    out = tmp_path / "structured"
    assert main(["prune", "--model", str(model_dir), "--calibration", str(calib_file), "--nsamples", "4",
                 "--seqlen", "32", "--method", "wanda", "--target", "mlp", "--mlp-ratio", "0.25",
                 "--non-uniform", "--output", str(out)]) == 0
    assert json.loads((out / "config.json").read_text()).get("pruned_shapes")  # really non-uniform
    assert main(["eval", "--model", str(out), "--dataset", str(calib_file), "--seqlen", "32",
                 "--max-windows", "1"]) == 0
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(["Other text for evaluation, not seen in training. " * 30] * 3))
    assert main(["recover", "--model", str(out), "--dataset", str(calib_file), "--max-steps", "1", "--seqlen",
                 "32", "--eval-dataset", str(held_out), "--eval-seqlen", "32", "--output", str(tmp_path / "rec")]) == 0


# --- item 3: resume checks what it resumes ------------------------------------------------------

def _interrupted_low_memory_run(model_dir, calib_file, out, after_block=0):
    env = dict(os.environ, PYTHONPATH=str(REPO), HFPRUNE_TEST_EXIT_AFTER_BLOCK=str(after_block))
    proc = subprocess.run([sys.executable, "-m", "hfprune.cli", "prune", "--model", str(model_dir),
                           "--calibration", str(calib_file), "--nsamples", "4", "--seqlen", "32", "--method",
                           "wanda", "--sparsity", "0.5", "--low-memory", "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    partial = out.parent / f".{out.name}.hfprune-partial"
    assert partial.is_dir(), proc.stderr
    return partial


def _resume(model_dir, calib_file, out):
    return main(["prune", "--model", str(model_dir), "--calibration", str(calib_file), "--nsamples", "4",
                 "--seqlen", "32", "--method", "wanda", "--sparsity", "0.5", "--low-memory", "--resume",
                 "--output", str(out)])


def test_resume_after_the_input_weights_changed_is_refused(model_dir, calib_file, tmp_path, caplog):
    out = tmp_path / "out"
    _interrupted_low_memory_run(model_dir, calib_file, out)
    tiny_model("llama", seed=1).save_pretrained(model_dir)  # same names and shapes, other weights
    assert _resume(model_dir, calib_file, out) == 2
    assert "another model" in caplog.text and not out.exists()


def test_resume_with_a_truncated_block_shard_fails_before_any_block(model_dir, calib_file, tmp_path, caplog):
    out = tmp_path / "out"
    partial = _interrupted_low_memory_run(model_dir, calib_file, out)
    shard = sorted(p for p in partial.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert _resume(model_dir, calib_file, out) == 2
    assert shard.name in caplog.text and "Drop --resume" in caplog.text
    assert "Traceback" not in caplog.text


def test_resume_with_a_truncated_state_file(model_dir, calib_file, tmp_path, caplog):
    out = tmp_path / "out"
    partial = _interrupted_low_memory_run(model_dir, calib_file, out)
    state = partial / "state.json"
    state.write_text(state.read_text()[:20])
    assert _resume(model_dir, calib_file, out) == 2
    assert "state.json" in caplog.text and "drop --resume" in caplog.text


# --- item 19 (low-memory part): a failed run leaves no progress or offload folders --------------

def test_failed_low_memory_run_leaves_nothing(model_dir, tmp_path, caplog):
    bad = tmp_path / "calib.txt"
    bad.write_text("too short")
    out = tmp_path / "out"
    rc = main(["prune", "--model", str(model_dir), "--calibration", str(bad), "--nsamples", "4", "--seqlen", "32",
               "--method", "wanda", "--low-memory", "--output", str(out)])
    assert rc == 2 and "fewer than nsamples" in caplog.text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- item 6: a sweep resumed with other settings or another model --------------------------------

def test_sweep_resumed_with_another_dtype_or_model_is_refused(model_dir, calib_file, tmp_path, caplog):
    out = tmp_path / "sweep"
    base = ["sweep", "--model", str(model_dir), "--calibration", str(calib_file), "--nsamples", "4", "--seqlen",
            "32", "--eval-dataset", str(calib_file), "--eval-seqlen", "32", "--max-windows", "1", "--methods",
            "magnitude", "--sparsities", "0.5", "--no-plot", "--output", str(out)]
    assert main(base + ["--dtype", "float32"]) == 0
    rows = (out / "results.jsonl").read_text()
    assert main(base + ["--dtype", "bfloat16"]) == 2
    assert "other settings" in caplog.text
    tiny_model("llama", seed=5).save_pretrained(model_dir)  # same path, other weights
    caplog.clear()
    assert main(base + ["--dtype", "float32"]) == 2 and "other settings" in caplog.text
    assert (out / "results.jsonl").read_text() == rows  # nothing mixed in


# --- item 7: NaN / Inf weights -------------------------------------------------------------------

@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(method, value):
    import hfprune

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = value
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = hfprune.MagnitudeConfig(sparsity=0.5) if method == "magnitude" else hfprune.WandaConfig(sparsity=0.5)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj has 1 NaN/Inf"):
        hfprune.prune(model, None, cfg, calibration=ids, progress=False)
    assert not (model.model.layers[0].mlp.up_proj.weight == 0).any()  # refused before any block was pruned


# --- item 11: windows longer than the model's positions ------------------------------------------

@pytest.fixture
def gpt2_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(path)  # n_positions=256
    tiny_tokenizer.save_pretrained(path)
    return path


def test_calibration_seqlen_beyond_positions_is_refused(gpt2_dir, calib_file, tmp_path, caplog):
    rc = main(["prune", "--model", str(gpt2_dir), "--calibration", str(calib_file), "--nsamples", "2", "--seqlen",
               "512", "--method", "wanda", "--output", str(tmp_path / "out")])
    assert rc == 2 and "512 tokens" in caplog.text and "at most 256 positions" in caplog.text
    assert not (tmp_path / "out").exists()


def test_eval_on_a_short_context_model(gpt2_dir, calib_file, caplog, capsys):
    long_text = calib_file.parent / "long.txt"
    long_text.write_text(TEXT * 30)
    assert main(["eval", "--model", str(gpt2_dir), "--dataset", str(long_text), "--max-windows", "1"]) == 0
    assert "x 256 tokens" in capsys.readouterr().out  # the default 2048 lowered to the model's positions
    assert main(["eval", "--model", str(gpt2_dir), "--dataset", str(long_text), "--seqlen", "1024"]) == 2
    assert "at most 256 positions" in caplog.text


@pytest.mark.parametrize("flag,value", [("--seqlen", "0"), ("--max-windows", "-1"), ("--seqlen", "abc")])
def test_eval_bad_numbers_are_usage_errors(gpt2_dir, flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", str(gpt2_dir), flag, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and flag in err and "Traceback" not in err


# --- item 13: data-free and self-generated calibration in every mode -----------------------------

def test_no_tokenizer_needed_for_magnitude_or_self_calibration(tmp_path, caplog):
    path = tmp_path / "notok"
    tiny_model("llama", vocab_size=20000).save_pretrained(path)  # no tokenizer; embeddings big enough for disk
    for n, extra in enumerate(([], ["--low-memory"])):
        assert main(["prune", "--model", str(path), "--method", "magnitude", "--sparsity", "0.5",
                     "--output", str(tmp_path / f"mag{n}"), *extra]) == 0
        assert main(["prune", "--model", str(path), "--method", "wanda", "--calibration", "self", "--nsamples",
                     "2", "--seqlen", "16", "--output", str(tmp_path / f"self{n}"), *extra]) == 0
    # text calibration without a tokenizer: a message that says what to add, before any pruning
    assert main(["prune", "--model", str(path), "--method", "wanda", "--calibration", "c4", "--nsamples", "2",
                 "--seqlen", "16", "--output", str(tmp_path / "c4")]) == 2
    assert "has no tokenizer" in caplog.text and "save_pretrained" in caplog.text


# --- items 17/18: calibration files that cannot be used say why ----------------------------------

@pytest.mark.parametrize("name,content,needle", [
    ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', "not a readable json file"),
    ("latin.txt", "caf\xe9 cr\xe8me ".encode("latin1") * 100, "not UTF-8 text"),
    ("nums.jsonl", b'{"text": 1}\n{"text": 2}\n', "holds int values"),
])
def test_unusable_calibration_files_are_messages(model_dir, tmp_path, caplog, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    rc = main(["prune", "--model", str(model_dir), "--calibration", str(path), "--nsamples", "2", "--seqlen", "16",
               "--method", "wanda", "--output", str(tmp_path / "out")])
    assert rc == 2 and needle in caplog.text and "Traceback" not in caplog.text


# --- item 18: sweep grids that cannot run ---------------------------------------------------------

@pytest.mark.parametrize("flags,needle", [(["--sparsities", "0.5,abc"], "'abc'"), (["--methods", ","], "grid is empty"),
                                          (["--sparsities", ""], "grid is empty")])
def test_bad_sweep_grids_fail_before_loading(model_dir, calib_file, tmp_path, caplog, flags, needle):
    rc = main(["sweep", "--model", str(model_dir), "--calibration", str(calib_file), "--nsamples", "2", "--seqlen",
               "16", "--methods", "magnitude", "--no-plot", "--output", str(tmp_path / "sw"), *flags])
    assert rc == 2 and needle in caplog.text


# --- item 4: tampered sparse checkpoints are refused --------------------------------------------

def _tamper(folder, key_suffix, fn):
    from safetensors.torch import load_file, save_file

    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        hits = [k for k in tensors if k.endswith(key_suffix)]
        if hits:
            tensors[hits[0]] = fn(tensors[hits[0]])
            save_file(tensors, shard, metadata={"format": "pt"})
            return hits[0]
    raise AssertionError(f"no tensor ending in {key_suffix}")


@pytest.mark.parametrize("pattern,suffix", [("unstructured", "bitmask"), ("2:4", "nm_code"), ("1:16", "nm_index")])
def test_tampered_sparse_checkpoint_is_refused(tmp_path, pattern, suffix):
    import hfprune
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    hfprune.prune(model, None, hfprune.MagnitudeConfig(pattern=pattern))
    out = tmp_path / "sparse"
    hfprune.save_pretrained(model, out, format="sparse")
    if suffix == "nm_code":  # a byte beyond the 6**3 codes of three 2:4 groups
        name = _tamper(out, suffix, lambda t: torch.full_like(t, 255))
    else:  # fewer mask bits / positions than the stored values need
        name = _tamper(out, suffix, lambda t: t[: t.numel() // 2].clone())
    with pytest.raises((ValueError, RuntimeError)):  # transformers reports conversion errors as RuntimeError
        AutoModelForCausalLM.from_pretrained(out)
    # what the loader reports for that weight (transformers folds it into its loading report)
    from safetensors.torch import load_file

    from hfprune.formats.codec import decompress_weight

    prefix = name[: name.index(".weight_")]
    stored = {k[len(prefix) + 1:]: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()
              if k.startswith(prefix + ".weight")}
    with pytest.raises(ValueError, match="Damaged hfprune-sparse checkpoint"):
        decompress_weight(stored, pattern=pattern)
    assert name.startswith("model.layers.")


# --- item 17: a pickle that holds more than tensors is refused with a message -------------------

def test_pickle_with_code_is_refused_with_a_message(tmp_path, caplog, capsys):
    path = tmp_path / "pickled"
    model = tiny_model("llama")
    model.config.save_pretrained(path)
    state = dict(model.state_dict())

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    state["extra"] = Payload()
    torch.save(state, path / "pytorch_model.bin")
    rc = main(["prune", "--model", str(path), "--method", "magnitude", "--output", str(tmp_path / "out")])
    assert rc == 2 and "is refused (Unsupported global: GLOBAL print)" in caplog.text
    assert "weights_only=False" in caplog.text and "Traceback" not in caplog.text
    assert "this must never run" not in capsys.readouterr().out and not (tmp_path / "out").exists()


def test_internal_errors_say_they_are_bugs(model_dir, calib_file, tmp_path, caplog, monkeypatch):
    import hfprune.core.layerwise as layerwise

    def broken(*args, **kwargs):
        raise ZeroDivisionError("an internal bug")

    monkeypatch.setattr(layerwise, "_block_report", broken)  # a bug inside the library, not an input error
    assert _prune(model_dir, calib_file, tmp_path / "out") == 1
    assert "This is a bug, not a problem with your input: please report it" in caplog.text
    assert not (tmp_path / "out").exists()


# --- item 18: a label that is not an index or a choice says what to give ------------------------

@pytest.mark.parametrize("label,needle", [("true", "is a boolean"), ("1.5", "is not a whole number")])
def test_task_file_label_of_the_wrong_kind(model_dir, tmp_path, caplog, label, needle):
    task = tmp_path / "task.jsonl"
    task.write_text(f'{{"prompt": "2 + 2 =", "choices": [" 4", " 5"], "label": 0}}\n'
                    f'{{"prompt": "3 + 3 =", "choices": [" 6", " 7"], "label": {label}}}\n')
    rc = main(["zeroshot", "--model", str(tmp_path / "not-loaded"), "--task", str(task)])
    assert rc == 2 and needle in caplog.text and "0-based index of the right choice" in caplog.text
    assert "Could not load a model" not in caplog.text  # checked before the model is loaded


# --- item 14: several processes with the default batch size -------------------------------------

def test_two_processes_with_the_default_batch(model_dir, calib_file, tmp_path):
    res = accelerate_launch("--cpu", ["prune", "--model", str(model_dir), "--calibration", str(calib_file),
                                      "--nsamples", "8", "--seqlen", "128", "--method", "sparsegpt", "--sparsity",
                                      "0.5", "--output", str(tmp_path / "two")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Process 1 of 2 calibrates on 4 of 8 windows" in res.stderr
    report = json.loads((tmp_path / "two" / "pruning_report.json").read_text())
    assert abs(report["sparsity"] - 0.5) < 1e-6


# --- recover evaluates within the model's positions by default ----------------------------------

def test_recover_default_eval_window_fits_a_short_context_model(gpt2_dir, calib_file, tmp_path, caplog):
    import logging

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(["Other text for evaluation, not seen in training. " * 60] * 10))
    with caplog.at_level(logging.INFO):
        assert main(["recover", "--model", str(gpt2_dir), "--dataset", str(calib_file), "--max-steps", "1",
                     "--seqlen", "32", "--eval-dataset", str(held_out), "--eval-max-windows", "1",
                     "--output", str(tmp_path / "rec")]) == 0
    assert "x 256 tokens" in caplog.text  # the protocol's 2048, lowered to GPT-2's 256 positions


def test_alias_converted_once_when_processes_start_together(tmp_path, monkeypatch):
    """Two runs started at once on a fresh cache: one converts the GGUF alias, the other waits and reuses it
    (it used to fail with "output folder is not empty")."""
    import threading
    import time

    from hfprune import models

    monkeypatch.setenv("HFPRUNE_CACHE", str(tmp_path))
    calls = []

    def slow_convert(alias, target):
        calls.append(alias)
        time.sleep(0.3)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf_alias", slow_convert)
    paths, errors = [], []

    def resolve():
        try:
            paths.append(models.resolve_model_path("smollm2-135m"))
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and calls == ["smollm2-135m"]
    assert paths == [str(tmp_path / "smollm2-135m")] * 3


# --- issue 28: every flag checked before the model loads, combinations refused up front -----------

@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a command gets as far as loading a model."""
    import hfprune.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(models, "load_model", refuse)


def test_recover_seqlen_beyond_positions_is_refused_before_loading(gpt2_dir, calib_file, tmp_path, caplog,
                                                                    no_model_load):
    rc = main(["recover", "--model", str(gpt2_dir), "--dataset", str(calib_file), "--max-steps", "1",
               "--seqlen", "100000", "--output", str(tmp_path / "rec")])
    assert rc == 2 and "training seqlen (--seqlen) is 100000 tokens" in caplog.text
    assert "at most 256 positions" in caplog.text and not (tmp_path / "rec").exists()


def test_recover_library_checks_the_seqlen_before_training(calib_file):
    from hfprune.workflows.recovery import RecoveryArguments, recover

    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="at most 256 positions"):
        recover(model, None, RecoveryArguments(dataset=str(calib_file), seqlen=100_000, max_steps=1))


@pytest.mark.parametrize("flags,needle", [
    (["--num-fewshot", "-1"], "num_fewshot (--num-fewshot) must be a whole number >= 0"),
    (["--batch-size", "-3"], "batch_size (--batch-size) must be a whole number >= 1, 'auto'"),
    (["--limit", "-5"], "limit (--limit) must be a whole number of documents >= 1 or a fraction in (0, 1)"),
    (["--limit", "0"], "limit (--limit) must be a whole number"),
    (["--limit", "nan"], "got nan"),
])
def test_eval_zero_shot_numbers_are_checked_before_loading(tmp_path, caplog, no_model_load, flags, needle):
    rc = main(["eval", "--model", str(tmp_path / "not-loaded"), "--tasks", "piqa", *flags])
    assert rc == 2 and needle in caplog.text and "Traceback" not in caplog.text


def test_float_calibration_tensor_is_refused():
    import hfprune

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="must be integer token ids .* got a torch.float32 tensor"):
        hfprune.prune(model, None, hfprune.WandaConfig(), calibration=torch.rand(2, 16), progress=False)
    assert not any((m.weight == 0).any() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_out_of_vocabulary_ids_name_the_vocabulary():
    import hfprune

    model = tiny_model("llama")
    ids = torch.randint(3, 300, (2, 16))
    ids[0, 0], ids[1, 5] = 3, 5000
    with pytest.raises(ValueError, match="ids from 3 to 5000, but the model's vocabulary has 320 entries"):
        hfprune.prune(model, None, hfprune.WandaConfig(), calibration=ids, progress=False)
    with pytest.raises(ValueError, match="vocabulary has 320 entries"):
        hfprune.perplexity(model, None, ids, seqlen=16, progress=False)


def test_meta_device_model_is_refused_before_work():
    import hfprune
    import transformers

    from conftest import tiny_config

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    for config in (hfprune.MagnitudeConfig(), hfprune.WandaConfig()):
        with pytest.raises(ValueError, match="weights, but they are not loaded .*meta device.*--low-memory"):
            hfprune.prune(model, None, config, calibration=torch.randint(3, 300, (2, 16)), progress=False)
    with pytest.raises(ValueError, match="Evaluation needs the model's weights"):
        hfprune.perplexity(model, None, torch.randint(3, 300, (1, 64)), seqlen=16, progress=False)


def test_a_method_name_is_a_config_and_anything_else_a_type_error():
    import hfprune

    ids = torch.randint(3, 300, (2, 16))
    by_name, by_config = tiny_model("llama"), tiny_model("llama")
    report = hfprune.prune(by_name, None, "wanda", calibration=ids, progress=False)
    hfprune.prune(by_config, None, hfprune.WandaConfig(), calibration=ids, progress=False)
    assert report.method == "wanda" and report.sparsity == pytest.approx(0.5)
    assert all(torch.equal(a, b) for a, b in zip(by_name.state_dict().values(), by_config.state_dict().values()))
    with pytest.raises(TypeError, match="a method name such as 'wanda'; got int"):
        hfprune.prune(tiny_model("llama"), None, 42)
    with pytest.raises(ValueError, match="Unknown pruning method 'wandaa'"):
        hfprune.prune(tiny_model("llama"), None, "wandaa")


def test_malformed_task_line_names_the_file_and_line(tmp_path, caplog, no_model_load):
    task = tmp_path / "task.jsonl"
    task.write_text('{"prompt": "2 + 2 =", "choices": [" 4", " 5"], "label": 0}\n\n'
                    '{"prompt": "3 + 3 =", "choices": [" 6", " 7"], "label": 0\n')
    rc = main(["zeroshot", "--model", str(tmp_path / "not-loaded"), "--task", str(task)])
    assert rc == 2 and f"{task}, line 3, column" in caplog.text and "not valid JSON" in caplog.text


def test_eval_split_error_is_about_evaluation(model_dir, caplog, data_dir):
    rc = main(["eval", "--model", str(model_dir), "--dataset", "wikitext2", "--split", "validation"])
    assert rc == 2 and "evaluate on the test split (--split test" in caplog.text
    assert "calibrat" not in caplog.text.lower()


def _non_uniform(tmp_path):
    import hfprune
    from hfprune.methods.structured import StructuredConfig

    model = tiny_model("llama")
    hfprune.prune(model, None, StructuredConfig(mlp_ratio=0.25, importance="magnitude", uniform=False), progress=False)
    out = tmp_path / "non-uniform"
    hfprune.save_pretrained(model, out)
    assert json.loads((out / "config.json").read_text()).get("pruned_shapes")
    return out


def _sparse(tmp_path):
    import hfprune

    model = tiny_model("llama")
    hfprune.prune(model, None, hfprune.MagnitudeConfig())
    out = tmp_path / "sparse"
    hfprune.save_pretrained(model, out, format="sparse")
    return out


@pytest.mark.parametrize("make,flags,needle", [
    (_non_uniform, ["--method", "depth", "--num-blocks", "1", "--keep-first", "0"],
     "Depth pruning of a non-uniform structured model"),
    (_non_uniform, ["--method", "wanda", "--low-memory"], "this is a non-uniform structured model"),
    (_sparse, ["--method", "wanda", "--low-memory"], "stored 'hfprune-sparse'-compressed"),
    (_sparse, ["--method", "wanda", "--resume"], "stored 'hfprune-sparse'-compressed"),
])
def test_unsupported_combinations_are_refused_before_loading(tmp_path, calib_file, caplog, tiny_tokenizer, make,
                                                             flags, needle, no_model_load):
    model = make(tmp_path)
    tiny_tokenizer.save_pretrained(model)
    out = tmp_path / "out"
    rc = main(["prune", "--model", str(model), "--calibration", str(calib_file), "--nsamples", "2", "--seqlen",
               "32", *flags, "--output", str(out)])
    assert rc == 2 and needle in caplog.text and "please report" not in caplog.text
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir() if "out" in p.name)


def test_depth_on_a_non_uniform_model_is_refused_by_the_library(tmp_path):
    import hfprune
    from hfprune.structured.depth import DepthPruningConfig

    model = hfprune.load_model(_non_uniform(tmp_path))
    with pytest.raises(ValueError, match="Depth pruning of a non-uniform structured model"):
        hfprune.prune(model, None, DepthPruningConfig(num_blocks=1, keep_first=0), progress=False)


def test_damaged_sparse_checkpoint_is_one_message(tmp_path):
    out = _sparse(tmp_path)
    _tamper(out, "bitmask", lambda t: t[: t.numel() // 2].clone())
    res = subprocess.run([sys.executable, "-m", "hfprune.cli", "eval", "--model", str(out), "--seqlen", "16"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "cannot be loaded: Damaged hfprune-sparse checkpoint: a bitmask holds" in res.stderr
    assert "(weight model.layers." in res.stderr
    assert "Traceback" not in res.stderr and "LOAD REPORT" not in res.stderr


def test_cli_refuses_an_encoder_decoder_checkpoint_before_loading(tmp_path, calib_file, caplog):
    import transformers

    path = tmp_path / "bart"
    config = transformers.BartConfig(vocab_size=320, d_model=64, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                     decoder_ffn_dim=128, max_position_embeddings=64)
    transformers.BartForConditionalGeneration(config).save_pretrained(path)
    import hfprune.models as models

    with pytest.raises(ValueError, match="is an encoder-decoder \\('bart'\\).*keep only its decoder.*Prune it from Python"):
        models._refuse_encoder_decoder("bart", path)
    rc = main(["prune", "--model", str(path), "--method", "magnitude", "--output", str(tmp_path / "out")])
    assert rc == 2 and "is an encoder-decoder" in caplog.text and not (tmp_path / "out").exists()
