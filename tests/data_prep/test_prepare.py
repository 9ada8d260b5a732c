"""prepare end to end: packing layout, decoding back to the documents, array split + merge == single run."""
import hashlib
import json

import numpy as np
import pytest

from calm_train.data.dataset_info import read_dataset_info
from calm_train.data.shards import read_split
from calm_train.data.tokenizer import load_tokenizer
from calm_train.data.verify import verify_dataset
from data_prep.cli import main

SEQ, K = 96, 4


def _docs() -> list[str]:
    from pydoc_data import topics
    docs = [topics.topics[k] for k in sorted(topics.topics)][:30]
    return docs + ["short", "x" * 7, "émoji 🙂 and <|endoftext|> as plain text"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs()))
    args = ["--input", str(src), "--seq-len", str(SEQ), "--patch-size", str(K), "--val-fraction", "0.2",
            "--samples-per-shard", "40"]
    assert main(args[:2] + ["--tokenizer", "train:500", "--out", str(root / "tok"), "--tokenizer-only"]) == 0
    tok = str(root / "tok" / "tokenizer.json")
    assert main(args + ["--tokenizer", tok, "--out", str(root / "single")]) == 0
    for i in range(3):
        assert main(args + ["--tokenizer", tok, "--out", str(root / "array"), "--shard-index", str(i),
                            "--num-shards", "3"]) == 0
    assert main(["--out", str(root / "array"), "--merge", "--workers", "2"]) == 0
    return root


def test_packing_decodes_to_documents_with_eos_pad_and_k_alignment(run):
    data = run / "single"
    info = verify_dataset(data)
    tok = load_tokenizer(data / info.tokenizer)
    assert (info.vocab_size, info.eos_id, info.pad_id, info.seq_len, info.patch_size) == (500, 498, 499, SEQ, K)
    from data_prep.encode import is_val
    docs = {"train": [d for d in _docs() if not is_val(d, 0.2)], "val": [d for d in _docs() if is_val(d, 0.2)]}
    assert len(docs["val"]) > 0 and info.documents == len(_docs())
    for split, texts in docs.items():
        rows = read_split(data, split)
        assert rows.shape == (info.splits[split]["samples"], SEQ)          # every sequence is seq_len
        stream = rows.reshape(-1)
        pos = 0
        for text in texts:
            assert pos % K == 0                                             # documents start on K boundaries
            eos = pos + int(np.argmax(stream[pos:] == info.eos_id))
            assert tok.decode(stream[pos:eos]) == text
            nxt = -(-(eos + 1) // K) * K
            assert (stream[eos + 1:nxt] == info.pad_id).all()               # PAD only up to the next K boundary
            pos = nxt
        assert (stream[pos:] == info.pad_id).all() and len(stream) - pos < SEQ   # the tail fills the last sample
        assert info.splits[split]["documents"] == len(texts)
        assert info.splits[split]["text_tokens"] + len(texts) + info.splits[split]["pad_tokens"] == pos


def test_array_split_and_merge_equals_single_process(run):
    single, array = run / "single", run / "array"
    assert read_dataset_info(single) == read_dataset_info(array)
    for split in ("train", "val"):
        assert np.array_equal(read_split(single, split), read_split(array, split))
        for shard in sorted((single / split).rglob("*.zstd")):
            twin = array / shard.relative_to(single)
            assert hashlib.sha256(shard.read_bytes()).digest() == hashlib.sha256(twin.read_bytes()).digest()
    assert not (array / ".work").exists() and not (run / ".array.prepare").exists()     # nothing staged is left
    assert len(list((single / "train").rglob("*.zstd"))) > 1


def test_merge_refuses_incomplete_array(tmp_path, run, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs()[:5]))
    tok = str(run / "tok" / "tokenizer.json")
    assert main(["--input", str(src), "--tokenizer", tok, "--out", str(tmp_path / "o"), "--shard-index", "1",
                 "--num-shards", "2"]) == 0
    assert main(["--out", str(tmp_path / "o"), "--merge"]) == 1
    assert "tasks [1] of 2 finished" in capsys.readouterr().err
    assert main(["--input", str(src), "--tokenizer", "train:500", "--out", str(tmp_path / "p"),
                 "--shard-index", "0", "--num-shards", "2"]) == 1


def test_bad_inputs_are_one_line_errors_naming_the_file(tmp_path, run, capsys):
    """Exit 1 and one line, before any output exists: an empty .jsonl, an unreadable file, non-UTF-8 bytes
    (their byte offset), a negative --samples-per-shard (usage: exit 2)."""
    import os
    tok = str(run / "tok" / "tokenizer.json")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    unreadable = tmp_path / "locked.txt"
    if os.geteuid() == 0:                           # root reads any mode-000 file: take one the kernel refuses
        unreadable.symlink_to("/proc/sys/vm/drop_caches")
    else:
        unreadable.write_text("secret")
        unreadable.chmod(0)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    text = tmp_path / "latin.txt"
    text.write_bytes(b"abc\xff")
    cases = [(empty, "the input gave no training documents"), (unreadable, "cannot be read (Permission denied)"),
             (latin, "not UTF-8 at byte 30"), (text, "not UTF-8 at byte 3")]
    for path, expected in cases:
        out = tmp_path / f"out-{path.name}"
        assert main(["--input", str(path), "--tokenizer", tok, "--out", str(out)]) == 1, path
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("calm-train prepare: error: ") and str(path) in line and expected in line, line
        assert not out.exists()
    with pytest.raises(SystemExit) as exit_:
        main(["--input", str(latin), "--tokenizer", tok, "--out", str(tmp_path / "o"), "--samples-per-shard", "-3"])
    assert exit_.value.code == 2 and "--samples-per-shard: '-3' is not an integer >= 1" in capsys.readouterr().err
