"""Input files -> a deterministic stream of documents.

Formats by file name: `.jsonl`/`.json` (JSON lines with a "text" field, optionally `.gz`/`.zst`),
`.parquet` (a "text" column), anything else plain text (one file = one document).  Plain JSON lines
and text are read directly, everything else with HF `datasets` in streaming mode, so inputs of any
size pass through in bounded memory (prepare cuts them into chunks: data_prep.chunks).  Globs are
expanded and sorted; a directory means every file below it, sorted.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import pathlib
import re
import sys
from typing import Iterator

from calm_train.data.dataset_info import DataError

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
SPLIT_WORDS = 10_000          # long documents are tokenized in pieces of at most this many words
READ_BATCH = 256
DIRECT_MAX_BYTES = 64 << 20
_WORD = re.compile(r"\S+")


def expand_inputs(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(pattern):
            found = sorted(str(p) for p in pathlib.Path(pattern).rglob("*") if p.is_file())
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            raise DataError(f"--input {pattern}: no such file or directory. "
                            "Fix: pass existing files, directories or quoted globs")
        if not found:
            raise DataError(f"--input {pattern}: matched no files. Fix: check the glob")
        files += [f for f in found if f not in files]
    for path in files:                  # before any work: every input can be opened
        try:
            open(path, "rb").close()
        except OSError as err:
            raise DataError(f"--input {path}: cannot be read ({err.strerror}). Fix: check its permissions, "
                            "or leave it out") from err
    return files


def decode_utf8(data: bytes, path: str, offset: int) -> str:
    """`data` (the bytes of `path` from byte `offset`) as text; a non-UTF-8 byte is named by its offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 at byte {offset + err.start} ({err.reason}). Fix: convert the file "
                        "to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from err


def json_lines(data: bytes, path: str, offset: int) -> Iterator[str]:
    """The non-empty "text" of each JSON line of `data` (the bytes of `path` from byte `offset`)."""
    for line in data.splitlines(keepends=True):
        if line.strip():
            try:
                row = json.loads(decode_utf8(line, path, offset))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: the line at byte {offset} is not JSON ({err}). "
                                "Fix: give JSON lines with a 'text' field") from err
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}: the line at byte {offset} has no 'text' string field. "
                                "Fix: give JSON lines with a 'text' field")
            if text:
                yield text
        offset += len(line)


def builder_for(path: str) -> str:
    name = path.lower()
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def iter_documents(files: list[str]) -> Iterator[str]:
    """Every non-empty document of `files`, in order.

    Inputs under DIRECT_MAX_BYTES in plain JSON lines or text are read directly (HF datasets spends
    ~4 s setting up a stream); the same documents come out either way.
    """
    if sum(os.path.getsize(f) for f in files) <= DIRECT_MAX_BYTES and all(direct_ok(f) for f in files):
        for path in files:
            yield from read_direct(path)
        return
    group: list[str] = []
    for path in files + [None]:
        if group and (path is None or builder_for(path) != builder_for(group[0])):
            yield from read_group(group)
            group = []
        if path is not None:
            group.append(path)


def direct_ok(path: str) -> bool:
    if builder_for(path) == "text":
        return True
    if not path.lower().endswith((".jsonl", ".json")):
        return False
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    if not first:
        return True                     # an empty file: no documents
    try:
        return isinstance(json.loads(decode_utf8(first, path, 0)), dict)
    except json.JSONDecodeError:
        return False


def read_direct(path: str) -> Iterator[str]:
    with open(path, "rb") as f:
        data = f.read()
    if builder_for(path) == "text":
        if data:                        # newlines as Python's text mode reads them
            yield decode_utf8(data, path, 0).replace("\r\n", "\n").replace("\r", "\n")
        return
    yield from json_lines(data, path, 0)


def read_group(files: list[str]) -> Iterator[str]:
    import datasets

    builder = builder_for(files[0])
    kwargs = {"sample_by": "document", "keep_linebreaks": True} if builder == "text" else {}
    if builder == "parquet":
        kwargs["columns"] = ["text"]
    ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    try:
        for batch in ds.iter(batch_size=READ_BATCH):
            if "text" not in batch:
                raise KeyError("text")
            for text in batch["text"]:
                if text:
                    yield text
    except KeyError as err:
        raise DataError(f"--input {files}: rows have no 'text' field ({err}). Fix: give JSON lines "
                         "or Parquet with a 'text' string column") from err


@functools.lru_cache(maxsize=4)
def _words(n: int) -> re.Pattern:
    """Matches n whole words (and the whitespace before each) at a position, in C."""
    word = r"\s*+\S++" if sys.version_info >= (3, 11) else r"\s*\S+(?!\S)"    # possessive: 1.5x faster
    return re.compile(f"(?:{word}){{{n}}}")


def split_long(text: str, max_words: int = SPLIT_WORDS) -> list[str]:
    """Cut `text` into pieces of about max_words words: each piece ends before the first word after
    its max_words-th whose preceding character is a single space after a non-space.

    The space stays with the next piece (as GPT-style pre-tokenizers attach it), so the pieces'
    tokens concatenate to a faithful encoding of the whole text.  A regex skips max_words words at
    a time, so only the few words at the cuts are looked at in Python (~100 MB/s on book-length
    documents, where a loop over every word ran at ~20 MB/s).
    """
    if len(text) < 6 * max_words:
        return [text]
    skip, pieces, start, pos = _words(max_words), [], 0, 0
    while (m := skip.match(text, pos)):
        for word in _WORD.finditer(text, m.end()):
            cut = word.start() - 1
            if cut - 1 > start and text[cut] == " " and not text[cut - 1].isspace():
                pieces.append(text[start:cut])
                start, pos = cut, word.start()
                break
        else:
            break
    pieces.append(text[start:])
    return pieces
