"""JSON Lines calibration files are read without importing datasets (about 80 MB of RSS per run), with
the same documents as datasets' JSON loader; anything else still goes through datasets."""

import gzip
import json
import subprocess
import sys

import pytest

from hfprune import data


def _via_datasets(monkeypatch, path, **kw):
    with monkeypatch.context() as m:
        m.setattr(data, "_read_json_lines", lambda *a, **k: None)
        return data.load_texts(str(path), **kw)


ROWS = [{"text": "first doc", "id": 1}, {"text": "", "id": 2}, {"id": 3}, {"text": "fourth \u00e9 doc\n", "id": 4}]


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.json.gz"])
def test_json_lines_same_documents_as_datasets(tmp_path, monkeypatch, name):
    path = tmp_path / name
    body = "\n".join(json.dumps(r) for r in ROWS) + "\n\n"
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(body)
    else:
        path.write_text(body, encoding="utf-8")
    ours = data.load_texts(str(path))
    assert ours == ["first doc", "fourth \u00e9 doc\n"]
    assert ours == _via_datasets(monkeypatch, path)


def test_json_lines_errors_name_the_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['body'\]\)"):
        data.load_texts(str(path))
    path.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(ValueError, match="holds int values"):
        data.load_texts(str(path))


def test_a_json_array_still_goes_through_datasets(tmp_path, monkeypatch):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert data._read_json_lines(path, "text") is None  # not one object per line
    assert data.load_texts(str(path)) == ["a", "b"]


def test_shared_c4_without_datasets(data_dir, monkeypatch):
    probe = ("import sys; from hfprune.data import load_texts; docs = load_texts('c4'); "
             "print(len(docs), 'datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "HFPRUNE_DATA_DIR": str(data_dir)}).stdout.split()
    assert out == ["1000", "False"]
    monkeypatch.setenv("HFPRUNE_DATA_DIR", str(data_dir))
    assert data.load_texts("c4") == _via_datasets(monkeypatch, data_dir / data.KNOWN_DATASETS["c4"]["file"])
