"""The input of prepare cut into chunks of about CHUNK_BYTES, in order, by a rule of the input alone.

A chunk is described by where its documents are, so that only the process that encodes it reads it:
  ("lines", path, lo, hi)   the lines of a plain JSON lines file that start in bytes [lo, hi)
                            (every CHUNK_BYTES of the file; no byte is read to plan them);
  ("texts", paths)          consecutive plain text files (one document each) of about CHUNK_BYTES;
  ("docs", texts)           documents of files only HF datasets reads (Parquet, compressed, JSON that
                            is not one object a line), streamed in order by every task.
`chunk_documents` gives a chunk's documents; over all chunks they are `sources.iter_documents`'s.
Chunk c goes to array task c % N and to any worker, so the split never changes the result.
"""
from __future__ import annotations

import os
from typing import Iterator

from data_prep.sources import builder_for, direct_ok, json_lines, read_direct, read_group

CHUNK_BYTES = 1 << 20


def _kind(path: str) -> str:
    if not direct_ok(path):
        return builder_for(path)                      # a datasets stream: "json" or "parquet"
    return "texts" if builder_for(path) == "text" else "lines"


def _runs(files: list[str]) -> Iterator[tuple[str, list[str]]]:
    """Maximal runs of consecutive files of one kind."""
    run: list[str] = []
    kind = ""
    for path in files:
        k = _kind(path)
        if run and k != kind:
            yield kind, run
            run = []
        kind = k
        run.append(path)
    if run:
        yield kind, run


def plan_chunks(files: list[str]) -> Iterator[tuple]:
    """The chunks of `files`, in order (see the module docstring)."""
    for kind, run in _runs(files):
        if kind == "lines":
            for path in run:
                size = os.path.getsize(path)
                for lo in range(0, size, CHUNK_BYTES):
                    yield "lines", path, lo, min(lo + CHUNK_BYTES, size)
        elif kind == "texts":
            group, size = [], 0
            for path in run:
                group.append(path)
                size += os.path.getsize(path)
                if size >= CHUNK_BYTES:
                    yield "texts", group
                    group, size = [], 0
            if group:
                yield "texts", group
        else:
            docs, size = [], 0
            for text in read_group(run):
                docs.append(text)
                size += len(text)
                if size >= CHUNK_BYTES:
                    yield "docs", docs
                    docs, size = [], 0
            if docs:
                yield "docs", docs


def read_lines(path: str, lo: int, hi: int) -> list[str]:
    """The non-empty "text" of each JSON line of `path` that starts in bytes [lo, hi)."""
    with open(path, "rb") as f:
        if lo:
            f.seek(lo - 1)
            f.readline()                              # to the first line that starts at >= lo
        start = f.tell()
        data = f.read(max(0, hi - start))
        if data and not data.endswith(b"\n"):
            data += f.readline()                      # the last line started before hi
    return list(json_lines(data, path, start))


def chunk_documents(chunk: tuple) -> list[str]:
    if chunk[0] == "lines":
        return read_lines(*chunk[1:])
    if chunk[0] == "texts":
        return [text for path in chunk[1] for text in read_direct(path)]
    return chunk[1]
