"""scripts/bench_zeroshot.py (resumable rows, work order, best 2:4 choice) and its section in scripts/bench_report.py,
with the model work replaced by fakes (no model is loaded or pruned)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module("bench_zeroshot")


def fake_row(name, task, limit, acc, seconds=10.0, max_load=1.0):
    return {"model": name, "task": task, "limit": limit, "metrics": {"acc": acc, "acc_stderr": 0.01, "n": 100},
            "n": 100, "wall_seconds": seconds, "lm_eval_version": "0.4.13", "hfprune_commit": "abc",
            "batch_size": 16, "command": "python scripts/bench_zeroshot.py --output x.json",
            "load": {"max_1min": max_load, "cores": 2, "quiet": max_load <= 2.5}}


def run_main(bench, monkeypatch, argv, scores, fail_after=None):
    """bench.main() with fake models; ``scores[(model, task)]`` is the acc a row gets. Returns the rows scored."""
    scored = []

    def get_model(name, cache, calibration):
        return object(), object(), f"{cache}/{name}", {"method": name, "command": bench.prune_command(name, calibration)}

    def evaluate_row(model, tok, name, ckpt, task, args):
        if fail_after is not None and len(scored) == fail_after:
            raise KeyboardInterrupt  # the session ends mid-run
        scored.append((name, task))
        return fake_row(name, task, args.limit, scores.get((name, task), 0.5))

    monkeypatch.setattr(bench, "get_model", get_model)
    monkeypatch.setattr(bench, "evaluate_row", evaluate_row)
    monkeypatch.setattr(sys, "argv", ["bench_zeroshot.py", *argv])
    bench.main()
    return scored


def test_plan_order_most_valuable_first(bench):
    work = bench.plan(list(bench.MODELS), None)
    assert work[:5] == [("dense", t) for t in bench.FIVE]
    firsts = [m for i, (m, _) in enumerate(work) if i == 0 or work[i - 1][0] != m]
    assert firsts == ["dense", "admm-2of4", "sparsegpt-2of4", "wanda-2of4", "admm-50", "sparsegpt-50", "wanda-50",
                      "obs-mlp-0.8x", "obs-mlp-0.8x-whole-0+29", "dense", bench.BEST_2OF4]
    assert work[-8:] == [("dense", t) for t in bench.NINE_EXTRA] + [(bench.BEST_2OF4, t) for t in bench.NINE_EXTRA]


def test_rows_are_kept_and_a_rerun_continues_where_it_stopped(bench, monkeypatch, tmp_path):
    out = tmp_path / "zs.json"
    argv = ["--models", "dense,wanda-2of4,admm-2of4", "--output", str(out), "--cache", str(tmp_path / "models")]
    scores = {("admm-2of4", t): 0.6 for t in bench.FIVE}  # admm is the best 2:4 model
    with pytest.raises(KeyboardInterrupt):
        run_main(bench, monkeypatch, argv, scores, fail_after=3)
    kept = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["task"]) for r in kept] == [("dense", t) for t in bench.FIVE[:3]]
    scored = run_main(bench, monkeypatch, argv, scores)
    assert scored[:2] == [("dense", t) for t in bench.FIVE[3:]]  # nothing done twice
    data = json.loads(out.read_text())
    assert data["best_2of4"] == "admm-2of4"
    assert scored[-4:] == [("admm-2of4", t) for t in bench.NINE_EXTRA]
    assert len(data["rows"]) == 3 * 5 + 2 * 4 and set(data["models"]) == {"dense", "wanda-2of4", "admm-2of4"}
    assert "--method admm --pattern 2:4 --calibration c4 --nsamples 64" in data["models"]["admm-2of4"]["command"]
    assert run_main(bench, monkeypatch, argv, scores) == []  # complete: a rerun scores nothing
    # Another limit is another row: a quick check never counts as the full split.
    assert len(run_main(bench, monkeypatch, [*argv, "--limit", "5", "--tasks", "piqa", "--models", "dense"],
                        scores)) == 1


def test_task_config_hash_names_the_yaml_and_its_data(bench, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "piqa.yaml").write_text("task: piqa\ndataset_kwargs:\n  data_files:\n    validation: piqa/v.jsonl\n")
    (tasks / "other.yaml").write_text("task: piqa_other\n")
    data = tmp_path / "data"
    (data / "piqa").mkdir(parents=True)
    (data / "piqa" / "v.jsonl").write_text("{}\n")
    info = bench.task_config_info("piqa", str(tasks), str(data))
    assert info["file"].endswith("tasks/piqa.yaml") and len(info["sha256"]) == 64
    assert info["data_files"] == ["piqa/v.jsonl"] and len(info["data_sha256"]) == 64
    (data / "piqa" / "v.jsonl").write_text("{}\n{}\n")
    assert bench.task_config_info("piqa", str(tasks), str(data))["data_sha256"] != info["data_sha256"]


def test_report_marks_missing_cells_and_noisy_times(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    report = importlib.import_module("bench_report")
    data = {"models": {"dense": {"method": "dense", "params": 134515008}},
            "rows": [fake_row("dense", "arc_easy", None, 0.7, seconds=120.0, max_load=9.5),
                     fake_row("dense", "piqa", None, 0.65, seconds=80.0)],
            "best_2of4": None}
    monkeypatch.setattr(report, "load", lambda name: data if name == "zeroshot_harness" else None)
    lines: list[str] = []
    report.section_zeroshot_harness(lines)
    text = "\n".join(lines)
    dense = next(line for line in text.splitlines() if line.startswith("| dense | 134,515,008"))
    assert "0.7000 ± 0.0100" in dense and "0.6500 ± 0.0100" in dense and "not run yet" in dense
    assert next(line for line in text.splitlines() if line.startswith("| admm-2of4 |")).count("not run yet") >= 10
    cost = next(line for line in text.splitlines() if line.startswith("| dense | 120"))
    assert cost.startswith("| dense | 120 † (9.5) | 80 |") and cost.endswith("| 200 |")
    assert "**Full splits**" in text


def test_report_counts_majority_answers_from_the_local_splits(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    report = importlib.import_module("bench_report")
    (tmp_path / "boolq").mkdir()
    doc = '{"question": "q", "passage": "p", "idx": %d, "label": "%s"}\n'
    (tmp_path / "boolq" / "val.jsonl").write_text(doc % (0, "true") + doc % (1, "True") + "\n" + doc % (2, "false"))
    monkeypatch.setenv("HFPRUNE_TASK_DATA_DIR", str(tmp_path))
    text = report._zs_majority()
    assert 'BoolQ 0.6667 ("yes")' in text and "RTE" not in text  # RTE's split is absent: left out
    monkeypatch.setenv("HFPRUNE_TASK_DATA_DIR", str(tmp_path / "nowhere"))
    assert report._zs_majority() == ""
