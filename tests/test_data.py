import gzip
import json

import pytest
import torch

import hfprune
from hfprune.core.calibration import get_calibration_ids, sample_windows
from hfprune.config import CalibrationConfig
from hfprune.data import load_eval_text, load_texts

TEXTS = [("word " * 200 + str(i)) for i in range(20)]


def test_windows_are_deterministic_and_shaped(tiny_tokenizer):
    a = sample_windows(tiny_tokenizer, TEXTS, 6, 32, seed=0)
    b = sample_windows(tiny_tokenizer, TEXTS, 6, 32, seed=0)
    c = sample_windows(tiny_tokenizer, TEXTS, 6, 32, seed=1)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_short_documents_use_the_joined_stream(tiny_tokenizer):
    lines = ["a short line number %d." % i for i in range(200)]
    ids = sample_windows(tiny_tokenizer, lines, 4, 64, seed=0)
    assert ids.shape == (4, 64)


def test_too_few_tokens(tiny_tokenizer):
    with pytest.raises(ValueError, match="fewer than nsamples x seqlen"):
        sample_windows(tiny_tokenizer, ["tiny text"], 4, 64)


def test_local_files(tmp_path, tiny_tokenizer):
    (tmp_path / "a.txt").write_text("\n".join(TEXTS))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        for t in TEXTS:
            fh.write(json.dumps({"content": t}) + "\n")
    (tmp_path / "c.json").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    import datasets

    datasets.Dataset.from_dict({"text": TEXTS}).to_parquet(str(tmp_path / "d.parquet"))
    assert load_texts(str(tmp_path / "a.txt")) == TEXTS
    assert load_texts(str(tmp_path / "b.jsonl.gz"), text_column="content") == TEXTS
    assert load_texts(str(tmp_path / "c.json")) == TEXTS
    assert load_texts(str(tmp_path / "d.parquet")) == TEXTS
    with pytest.raises(ValueError, match="no column 'text'"):
        load_texts(str(tmp_path / "b.jsonl.gz"))
    ids = get_calibration_ids(CalibrationConfig(dataset=str(tmp_path / "d.parquet"), nsamples=3, seqlen=16),
                              tiny_tokenizer)
    assert ids.shape == (3, 16)


def test_missing_file_error():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts("data/missing.jsonl")


def test_unreachable_hub_dataset_offers_self():
    with pytest.raises(RuntimeError, match="calibration='self'"):
        load_texts("some-user/no-such-dataset-xyz")


def test_list_of_strings_and_tensor(tiny_tokenizer):
    ids = get_calibration_ids(CalibrationConfig(dataset=TEXTS, nsamples=2, seqlen=8), tiny_tokenizer)
    assert ids.shape == (2, 8)
    t = torch.randint(0, 10, (3, 5))
    assert torch.equal(get_calibration_ids(CalibrationConfig(dataset=t), None), t)
    with pytest.raises(ValueError, match="tokenizer"):
        get_calibration_ids(CalibrationConfig(dataset=TEXTS, nsamples=2, seqlen=8), None)


def test_shared_c4_and_wikitext(data_dir, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("HFPRUNE_DATA_DIR", str(data_dir))
    docs = load_texts("c4")
    assert len(docs) == 1000
    rows = load_texts("wikitext2", split="test")
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    text = load_eval_text("wikitext2")
    assert text.startswith("\n\n = Robert Boulter = \n" + "\n\n" + "\n\n" + " Robert Boulter is")
    a = get_calibration_ids(CalibrationConfig(dataset="c4", nsamples=4, seqlen=64), tiny_tokenizer)
    b = get_calibration_ids(CalibrationConfig(dataset="c4", nsamples=4, seqlen=64), tiny_tokenizer)
    assert torch.equal(a, b)


def test_bad_data_dir(monkeypatch):
    monkeypatch.setenv("HFPRUNE_DATA_DIR", "/no/such/dir")
    with pytest.raises(FileNotFoundError, match="HFPRUNE_DATA_DIR"):
        load_texts("c4")


def test_self_generated_calibration(tiny_tokenizer):
    from conftest import tiny_model

    model = tiny_model("llama")
    ids = get_calibration_ids(CalibrationConfig(dataset="self", nsamples=2, seqlen=12, seed=3), tiny_tokenizer, model)
    again = get_calibration_ids(CalibrationConfig(dataset="self", nsamples=2, seqlen=12, seed=3), tiny_tokenizer, model)
    assert ids.shape == (2, 12) and torch.equal(ids, again)
    report = hfprune.prune(model, tiny_tokenizer, hfprune.WandaConfig(sparsity=0.5), calibration="self",
                           nsamples=2, seqlen=12, progress=False)
    assert report.sparsity == pytest.approx(0.5)
