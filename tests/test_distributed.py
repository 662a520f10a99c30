"""Several calibration processes give bit-identical masks and weights to one process.

The multi-process runs use ``accelerate launch --multi_gpu --num_processes 2`` on CPU (torch's
elastic launcher, gloo) and ``accelerate launch --cpu --num_processes 2``: accelerate 1.15 starts
several CPU processes only through mpirun (not installed here), so hfprune starts the other
calibration processes itself (:func:`hfprune.core.distributed.start_cpu_workers`).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hfprune.cli import main
from hfprune.core.distributed import ChunkedStats, DistContext, finalize_stats, shard_windows
from hfprune.stats import RowNormStats

from conftest import TEXT, accelerate_launch, tiny_model


def _tensors(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def test_shards_cover_every_window_once():
    for world in (1, 2, 3):
        seen, batches = [], []
        for rank in range(world):
            windows, batch_ids, n_chunks, k = shard_windows(13, 2, DistContext(rank, world))
            seen += windows
            batches += batch_ids
        assert sorted(seen) == list(range(13)) and sorted(batches) == list(range(7))
    with pytest.raises(ValueError, match="processes"):
        shard_windows(4, 2, DistContext(0, 3))


def test_chunked_sum_is_a_fixed_order():
    class FakeRunner:
        current_batch = 0

    runner = FakeRunner()
    xs = [torch.randn(5, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    acc = ChunkedStats(lambda: RowNormStats(8), runner, n_chunks=3, chunk_size=2, ctx=DistContext())
    for b, x in enumerate(xs):
        runner.current_batch = b
        acc.add_batch(x)
    total = finalize_stats({"a": acc})["a"]
    chunks = []
    for c in range(3):
        s = RowNormStats(8)
        s.add_batch(xs[2 * c])
        s.add_batch(xs[2 * c + 1])
        chunks.append(s.sq_norm)
    assert torch.equal(total.sq_norm, (chunks[0] + chunks[1]) + chunks[2]) and total.tokens == 30


@pytest.mark.parametrize("launcher,method", [("--multi_gpu", "sparsegpt"), ("--cpu", "sparsegpt"), ("--cpu", "admm"),
                                             ("--cpu", "admm --dense-targets model")])
def test_two_processes_match_one(tmp_path, tiny_tokenizer, launcher, method):
    model_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(model_dir, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(model_dir)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join([TEXT] * 5))
    args = ["prune", "--model", str(model_dir), "--calibration", str(calib), "--nsamples", "8", "--seqlen", "32",
            "--batch-size", "2", "--method", *method.split(), "--sparsity", "0.5", "--owl"]
    res = accelerate_launch(launcher, args + ["--low-memory", "--output", str(tmp_path / "two")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Process 1 of 2 calibrates on 4 of 8 windows" in res.stderr
    if launcher == "--cpu":
        assert "hfprune starts the other 1 calibration processes itself" in res.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args + ["--output", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one, two = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert set(one) == set(two) and all(torch.equal(one[k], two[k]) for k in one)
    r1 = json.loads((tmp_path / "one" / "pruning_report.json").read_text())
    r2 = json.loads((tmp_path / "two" / "pruning_report.json").read_text())
    assert r1["layers"] == r2["layers"]


def test_num_processes_read_from_the_launcher_options_only():
    from hfprune.core.distributed import _num_processes_from_launch_args as parse

    assert parse(["python", "accelerate", "launch", "--cpu", "--num_processes", "3", "hfprune", "prune"]) == 3
    assert parse(["accelerate", "launch", "--num-processes=4", "hfprune"]) == 4
    # After the script, the options belong to the script.
    assert parse(["accelerate", "launch", "--cpu", "train.py", "--num_processes", "5"]) is None
    assert parse(["python", "train.py"]) is None


def test_no_extra_processes_outside_accelerate_cpu(monkeypatch):
    from hfprune.core.distributed import requested_cpu_processes

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert requested_cpu_processes() == 1
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun / --multi_gpu already started them
    assert requested_cpu_processes() == 1
    monkeypatch.delenv("WORLD_SIZE")
    assert requested_cpu_processes() == 1  # the parent here is pytest, not `accelerate launch`
