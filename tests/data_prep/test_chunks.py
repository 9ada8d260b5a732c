"""prepare's chunks: byte ranges of JSON lines and groups of text files give iter_documents' documents,
in order, for any chunk size (lines longer than a chunk, CRLF, blank lines, no final newline); the
regex-skipping split_long cuts where the word-by-word rule does."""
import json
import os
import random
import re
import types

import pytest

from calm_train.data.dataset_info import DataError
from data_prep import chunks, sources
from data_prep.sources import iter_documents

DOCS = ["first", "a much longer document " * 5, "", "ünï 🙂", "x", "tail without newline"]


@pytest.fixture()
def files(tmp_path):
    lines = [json.dumps({"text": t, "n": i}) for i, t in enumerate(DOCS)]
    (tmp_path / "a.jsonl").write_bytes(("\r\n".join(lines[:3]) + "\r\n\n  \n" + "\n".join(lines[3:])).encode())
    (tmp_path / "b.txt").write_text("text file one\n")
    (tmp_path / "c.txt").write_text("text file two")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "last"}) + "\n")
    return [str(tmp_path / n) for n in ("a.jsonl", "b.txt", "c.txt", "d.jsonl")]


@pytest.mark.parametrize("chunk_bytes", [1, 2, 7, 30, 31, 64, 1 << 20])
def test_chunks_give_the_documents_in_order(files, monkeypatch, chunk_bytes):
    monkeypatch.setattr(chunks, "CHUNK_BYTES", chunk_bytes)
    plan = list(chunks.plan_chunks(files))
    got = [text for chunk in plan for text in chunks.chunk_documents(chunk)]
    assert got == list(iter_documents(files)) == [d for d in DOCS if d] + ["text file one\n", "text file two", "last"]
    size = os.path.getsize(files[0])
    assert sum(c[0] == "lines" and c[1] == files[0] for c in plan) == -(-size // chunk_bytes)
    b_txt_bytes = 14                                   # a chunk of text files closes at >= chunk_bytes
    assert [c[1] for c in plan if c[0] == "texts"] == (
        [files[1:3]] if chunk_bytes > b_txt_bytes else [files[1:2], files[2:3]])


def test_bad_line_names_file_and_place(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: the line at byte 15 has no 'text' string field"):
        chunks.read_lines(str(path), 0, path.stat().st_size)


def _split_word_by_word(text: str, max_words: int) -> list[str]:
    """split_long's rule, one word at a time (its first implementation)."""
    pieces, start, words = [], 0, 0
    for m in re.finditer(r"\S+", text):
        words += 1
        cut = m.start() - 1
        if words > max_words and cut - 1 > start and text[cut] == " " and not text[cut - 1].isspace():
            pieces.append(text[start:cut])
            start, words = cut, 1
    return pieces + [text[start:]]


@pytest.mark.parametrize("version", [(3, 10), (3, 11)])
def test_split_long_matches_the_word_by_word_rule(monkeypatch, version):
    monkeypatch.setattr(sources, "sys", types.SimpleNamespace(version_info=version))
    sources._words.cache_clear()
    rng = random.Random(0)
    atoms = [" ", "  ", "\n", "\t", "a", "bb", "ccc", "\u3000", "\xa0", " x", ".", "é🙂"]
    cases = [("".join(rng.choice(atoms) for _ in range(rng.randint(0, 90))), rng.randint(1, 6)) for _ in range(2000)]
    split = 0
    for text, n in cases:
        pieces = sources.split_long(text, n)
        assert pieces == (_split_word_by_word(text, n) if len(text) >= 6 * n else [text])
        split += len(pieces) > 1
    sources._words.cache_clear()
    assert split > 500
