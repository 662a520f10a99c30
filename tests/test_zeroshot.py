"""Zero-shot tasks through lm-evaluation-harness on local files (hfprune.eval.zeroshot)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from hfprune.card import zeroshot_rows
from hfprune.eval import taskdata, zeroshot
from hfprune.eval.zeroshot import SUITES, TASK_DIR, available_tasks, expand_tasks

from conftest import DATA_DIR, GraphRecorder, tiny_model

lm_eval = pytest.importorskip("lm_eval")

TASKS_DATA = DATA_DIR / "tasks"
NINE = ["piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "openbookqa", "rte", "lambada_openai",
        "hellaswag"]
# Stock config each shipped config copies its prompt and metrics from (lm_eval/tasks/...).
STOCK = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_easy.yaml",
         "winogrande": "winogrande/default.yaml", "boolq": "super_glue/boolq/default.yaml",
         "openbookqa": "openbookqa/openbookqa.yaml", "rte": "glue/rte/default.yaml",
         "lambada_openai": "lambada/lambada_openai.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
         "hellaswag_full_approx": "hellaswag/hellaswag.yaml"}
PROMPT_KEYS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "target_delimiter",
               "fewshot_delimiter")
# Items per split (../shared/data/tasks/README.md).
COUNTS = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "winogrande": 1267, "boolq": 3270,
          "openbookqa": 500, "rte": 277, "lambada_openai": 5153, "hellaswag": 1000, "hellaswag_full_approx": 10042}

ARC_ITEMS = [
    {"id": "q1", "question": {"stem": "Which is a color?", "choices": [
        {"text": "blue", "label": "A"}, {"text": "dog", "label": "B"}, {"text": "run", "label": "C"}]},
     "answerKey": "A"},
    {"id": "q2", "question": {"stem": "What do fish live in?", "choices": [
        {"text": "water", "label": "1"}, {"text": "sand", "label": "2"}]}, "answerKey": "1"},
    {"id": "q3", "question": {"stem": "The quick brown fox jumps over the", "choices": [
        {"text": "lazy dog", "label": "A"}, {"text": "weights", "label": "B"}, {"text": "text", "label": "C"},
        {"text": "network", "label": "D"}]}, "answerKey": "A"},
]
BOOLQ_ITEMS = [
    {"question": "is the fox quick", "passage": "Fox -- The quick brown fox jumps over the lazy dog.", "idx": 0,
     "label": "true"},
    {"question": "is pruning slow", "passage": "Pruning -- Pruning removes weights to make it faster.", "idx": 1,
     "label": "false"},
]


@pytest.fixture
def task_data(tmp_path, monkeypatch):
    """A data folder with tiny ARC-Easy and BoolQ files in the original formats."""
    root = tmp_path / "data"
    (root / "tasks" / "arc_easy").mkdir(parents=True)
    (root / "tasks" / "boolq").mkdir(parents=True)
    (root / "tasks" / "arc_easy" / "ARC-Easy-Test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in ARC_ITEMS))
    (root / "tasks" / "boolq" / "val.jsonl").write_text("".join(json.dumps(d) + "\n" for d in BOOLQ_ITEMS))
    monkeypatch.setenv("HFPRUNE_DATA_DIR", str(root))
    monkeypatch.delenv("HFPRUNE_TASK_DATA_DIR", raising=False)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("zs") / "model"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_suites_expand_in_order_without_repeats():
    assert expand_tasks("paper-7") == list(SUITES["paper-7"])
    assert set(SUITES["llm-pruner-7"]) ^ set(SUITES["paper-7"]) == {"piqa", "rte"}
    assert expand_tasks("piqa,paper-7,boolq") == ["piqa", *SUITES["paper-7"]]
    assert expand_tasks(["llm-pruner-7", "rte", "lambada_openai"])[-2:] == ["rte", "lambada_openai"]
    assert set(NINE) <= set(available_tasks())
    with pytest.raises(ValueError, match="Unknown zero-shot task 'hellaswagg'.*paper-7"):
        expand_tasks("hellaswagg")
    with pytest.raises(ValueError, match="No zero-shot task"):
        expand_tasks(" , ")


@pytest.mark.parametrize("task", sorted(STOCK))
def test_configs_copy_the_stock_prompts_and_metrics(task):
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = load_yaml(TASK_DIR / f"{task}.yaml", resolve_func=True)
    stock = load_yaml(Path(lm_eval.__file__).parent / "tasks" / STOCK[task], resolve_func=True)
    for key in PROMPT_KEYS:
        a, b = ours.get(key), stock.get(key)
        if callable(b):  # WinoGrande: the harness's own functions, re-exported
            assert a.__code__.co_code == b.__code__.co_code and a.__name__ == b.__name__, key
        else:
            assert a == b, (task, key)
    assert ours["custom_dataset"].__name__ == "load"
    assert "num_fewshot" not in ours and "fewshot_config" not in ours


@pytest.mark.skipif(not TASKS_DATA.is_dir(), reason="no ../shared/data/tasks")
@pytest.mark.parametrize("task", sorted(COUNTS))
def test_configs_point_at_the_local_splits(task, monkeypatch):
    monkeypatch.setenv("HFPRUNE_DATA_DIR", str(DATA_DIR))
    cfg = zeroshot.task_configs()[task]
    files = zeroshot.check_task_files(task)[task]
    assert files and all(f.exists() and TASKS_DATA in f.parents for f in files)
    kwargs = cfg["dataset_kwargs"]
    assert kwargs["task"] == task
    rows = taskdata.READERS[kwargs["reader"]](files[0])
    assert len(rows) == COUNTS[task]
    (split,) = kwargs["data_files"]
    assert split in (cfg.get("test_split"), cfg.get("validation_split"))
    first = rows[0]
    needed = {"piqa": {"goal", "sol1", "sol2", "label"}, "winogrande": {"sentence", "option1", "option2", "answer"},
              "boolq": {"passage", "question", "label"}, "rte": {"sentence1", "sentence2", "label"},
              "lambada_openai": {"text"}, "openbookqa": {"question_stem", "choices", "answerKey"},
              "hellaswag": {"query", "choices", "label"}, "hellaswag_full_approx": {"query", "choices", "label"}}
    assert needed.get(task, {"question", "choices", "answerKey"}) <= set(first)
    if task.startswith("arc") or task == "openbookqa":
        assert all(r["answerKey"].strip() in r["choices"]["label"] for r in rows)


def test_readers_convert_to_the_hub_schema(task_data):
    arc = taskdata.load(data_files={"test": "arc_easy/ARC-Easy-Test.jsonl"}, reader="arc", task="arc_easy",
                        version=1.0)
    assert arc["test"][1] == {"id": "q2", "question": "What do fish live in?",
                              "choices": {"text": ["water", "sand"], "label": ["1", "2"]}, "answerKey": "1"}
    boolq = taskdata.load(data_files={"validation": "boolq/val.jsonl"}, reader="boolq")
    assert boolq["validation"]["label"] == [1, 0]


def test_missing_file_names_it_and_where_to_put_it(task_data, model_dir, caplog):
    from hfprune.cli import main

    with pytest.raises(taskdata.MissingTaskDataError) as err:
        zeroshot.check_task_files("paper-7")
    message = str(err.value)
    assert str(task_data / "tasks" / "rte" / "glue_rte_validation_arrow") in message
    assert "Put the rte evaluation split there" in message and "HFPRUNE_DATA_DIR" in message
    # The CLI fails the same way before it loads anything: the model path does not even exist.
    assert main(["eval", "--model", str(model_dir / "nope"), "--tasks", "piqa"]) == 2
    assert f"needs the file {task_data / 'tasks' / 'piqa' / 'hf_piqa_validation_arrow'}" in caplog.text
    assert "whose tasks/ holds piqa/hf_piqa_validation_arrow" in caplog.text


def test_python_api_scores_an_in_memory_model(task_data, tiny_tokenizer):
    import hfprune
    from hfprune.eval.cloze import score_choices

    model = tiny_model("llama")
    result = hfprune.evaluate(model, tiny_tokenizer, tasks="arc_easy,boolq", limit=2, batch_size=4)
    assert "perplexity" not in result and result["linear_sparsity"] == 0.0
    zs = result["zeroshot"]
    assert list(zs["tasks"]) == ["arc_easy", "boolq"] and zs["means"] == {}
    arc = zs["tasks"]["arc_easy"]
    assert arc["n"] == 2 and arc["n_total"] == 3
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(arc)
    # The harness's answers equal an independent log-likelihood scorer's on the same prompts.
    hits = 0
    for item in ARC_ITEMS[:2]:
        q = item["question"]
        lls = score_choices(model, tiny_tokenizer, f"Question: {q['stem']}\nAnswer:",
                            [" " + c["text"] for c in q["choices"]])
        gold = [c["label"] for c in q["choices"]].index(item["answerKey"])
        hits += max(range(len(lls)), key=lls.__getitem__) == gold
    assert arc["acc"] == pytest.approx(hits / 2)
    assert 0.0 <= zs["tasks"]["boolq"]["acc"] <= 1.0 and zs["tasks"]["boolq"]["n"] == 2


def test_cli_json_matches_the_python_api(task_data, model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfprune.cli import main
    from hfprune.eval.zeroshot import zeroshot_evaluate

    out = tmp_path / "zs.json"
    assert main(["eval", "--model", str(model_dir), "--tasks", "arc_easy", "--limit", "3", "--batch-size", "2",
                 "--json", "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    api = zeroshot_evaluate(model, AutoTokenizer.from_pretrained(model_dir), "arc_easy", limit=3, batch_size=2)
    for key in ("acc", "acc_norm", "acc_stderr"):
        assert printed["zeroshot"]["tasks"]["arc_easy"][key] == api["tasks"]["arc_easy"][key]
    assert main(["eval", "--model", str(model_dir), "--tasks", "arc_easy", "--output", str(out)]) == 2  # exists


def test_papers_mean_and_tables():
    tasks = {t: {"acc": 0.5 + 0.01 * i, "acc_stderr": 0.01, "n": 10} for i, t in enumerate(SUITES["paper-7"])}
    means = zeroshot._means(tasks)
    assert list(means) == ["paper-7"]
    assert means["paper-7"]["acc"] == pytest.approx(0.53)
    result = {"tasks": tasks, "means": means, "limit": 10, "lm_eval_version": "0.4.13", "seconds": 1.0}
    text = zeroshot.format_results(result)
    assert "mean paper-7" in text and "0.5300" in text and "--limit 10" in text
    rows = zeroshot_rows(result, result)
    assert "| **mean paper-7** | acc | 0.5300 | 0.5300 |" in rows
    assert any(r.startswith("| boolq | acc | 0.5000 ± 0.0100 |") for r in rows)


def test_search_with_a_zero_shot_accuracy_budget():
    from hfprune.workflows.sweep import format_probes, search

    def fn(s):  # accuracy falls with sparsity, perplexity rises
        return {"perplexity": 10.0 + 10 * s, "zeroshot_acc": 0.60 - 0.2 * s * s}

    result = search(method="wanda", max_acc_drop=0.02, evaluate_fn=fn, tol=0.01, progress=False)
    edge = math.sqrt(0.02 / 0.2)  # 0.316
    assert edge - 0.01 <= result["sparsity"] <= edge
    assert result["budget_metric"] == "zeroshot_acc" and result["budget_acc"] == pytest.approx(0.58)
    assert result["dense_zeroshot_acc"] == 0.60 and result["zeroshot_acc"] >= 0.58
    assert all(p["within_budget"] == (p["zeroshot_acc"] >= 0.58) for p in result["probes"])
    assert "| zero-shot acc |" in format_probes(result)
    with pytest.raises(ValueError, match="max_acc_drop needs tasks"):
        search("some-model", method="wanda", max_acc_drop=0.02)
    with pytest.raises(ValueError, match="exactly one budget"):
        search(method="wanda", max_acc_drop=0.02, max_ppl=3, evaluate_fn=fn)


def test_sweep_has_a_zero_shot_column(task_data, tiny_tokenizer, tmp_path):
    from hfprune.workflows.sweep import format_table, sweep

    text = ["The quick brown fox jumps over the lazy dog. " * 30] * 2
    rows = sweep(lambda: (tiny_model("llama"), tiny_tokenizer), "magnitude", [0.5], calibration="c4",
                 eval_dataset=text, eval_seqlen=32, max_windows=1, output_dir=tmp_path / "sw", progress=False,
                 plot=False, tasks="arc_easy", task_limit=2, task_batch_size=4)
    assert [r["method"] for r in rows] == ["dense", "magnitude"]
    for r in rows:
        assert r["zeroshot"]["arc_easy"]["n"] == 2 and r["zeroshot_acc"] == r["zeroshot"]["arc_easy"]["acc"]
    assert rows[0]["settings"]["tasks"] == ["arc_easy"] and rows[0]["settings"]["task_limit"] == 2
    assert "zeroshot_acc" in (tmp_path / "sw" / "results.csv").read_text().splitlines()[0]
    assert "| zero-shot acc |" in format_table(rows)


def test_model_card_reports_zero_shot_next_to_perplexity():
    from hfprune.card import render_model_card

    zs = {"tasks": {"boolq": {"acc": 0.61, "acc_stderr": 0.01}}, "means": {}, "limit": None,
          "lm_eval_version": "0.4.13"}
    text = render_model_card(base_model="x/y", pruning_config={"method": "wanda", "sparsity": 0.5},
                             eval_results={"before": {"perplexity": 20.0}, "after": {"perplexity": 25.0},
                                           "zeroshot": {"before": zs, "after": zs}})
    assert "| perplexity | 20 | 25 |" in text and "### Zero-shot accuracy" in text
    assert "| boolq | acc | 0.6100 ± 0.0100 | 0.6100 ± 0.0100 |" in text and "zeroshot" not in text.split("```json")[0]


def test_prune_eval_tasks_puts_zero_shot_in_the_card(task_data, model_dir, tmp_path):
    from hfprune.cli import main

    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--output",
                 str(out), "--eval-tasks", "arc_easy", "--eval-limit", "2"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    before, after = results["zeroshot"]["before"], results["zeroshot"]["after"]
    assert before["tasks"]["arc_easy"]["n"] == after["tasks"]["arc_easy"]["n"] == 2
    card = (out / "README.md").read_text()
    assert "### Zero-shot accuracy" in card and "| arc_easy | acc |" in card
    assert main(["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--output",
                 str(tmp_path / "other"), "--eval-tasks", "rte"]) == 2  # missing file: nothing written
    assert not (tmp_path / "other").exists()


def test_missing_lm_eval_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        zeroshot._require_lm_eval()


def test_zero_shot_evaluation_builds_no_autograd_graph(task_data, tiny_tokenizer):
    from hfprune.eval.zeroshot import zeroshot_evaluate

    model = tiny_model("llama")
    with GraphRecorder(model.model.layers[0]) as graph:
        zeroshot_evaluate(model, tiny_tokenizer, "arc_easy,boolq", limit=2, batch_size=2)
    assert graph.grad_modes and not any(graph.grad_modes)
    assert graph.saved_bytes == 0 and torch.is_grad_enabled()
