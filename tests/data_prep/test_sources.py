"""Inputs: JSON lines, Parquet and text through HF datasets streaming give the same documents as the
direct reader; globs expand sorted; the embedded corpus is ~2 MB of sorted prose."""
import json

import pytest

from calm_train.data.dataset_info import DataError
from data_prep import sources
from data_prep.embedded import default_corpus, write_corpus_jsonl


def test_formats_and_streaming_path_agree(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["first doc\nwith two lines", "", "second \u00e9t\u00e9", "third"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)))
    pq.write_table(pa.table({"text": docs}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("plain text file\n\nas one document\n")
    files = sources.expand_inputs([str(tmp_path / "*.jsonl"), str(tmp_path / "b.parquet"), str(tmp_path / "c.txt")])
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.jsonl", "b.parquet", "c.txt"]
    want = [d for d in docs if d] * 2 + ["plain text file\n\nas one document\n"]
    assert list(sources.iter_documents(files)) == want
    monkeypatch.setattr(sources, "DIRECT_MAX_BYTES", 0)          # force HF datasets streaming everywhere
    assert list(sources.iter_documents(files)) == want
    with pytest.raises(DataError, match="matched no files"):
        sources.expand_inputs([str(tmp_path / "*.nothing")])


def test_default_corpus_is_stable_prose(tmp_path):
    docs = default_corpus()
    size = sum(len(d.encode()) for d in docs)
    assert 1_000_000 < size < 4_000_000 and len(docs) > 300
    assert docs[0].startswith('The "assert" statement')
    path = write_corpus_jsonl(tmp_path / "c.jsonl", docs[:3])
    assert [json.loads(line)["text"] for line in path.read_text().splitlines()] == docs[:3]
