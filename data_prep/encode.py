"""Stage 1 of prepare: documents -> K-aligned packed token streams of one task.

The input is cut into chunks of ~1 MiB in input order (data_prep.chunks: a rule that depends only on
the input, not on the number of workers or tasks).  Chunk c belongs to task c % num_shards, so an
array of tasks splits the work and `merge` puts the chunks back in order: the result equals a
single-process run.  Each chunk is read and tokenized by one process of a pool (spawned, one tokenizer
thread each; JSON lines chunks are byte ranges that the worker reads itself) and appended to the
task's `train.bin` / `val.bin` (uint32), with per-chunk token counts in `task.json`.
"""
from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import pathlib
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from calm_train.data.tokenizer import Tokenizer, load_tokenizer
from data_prep.chunks import chunk_documents, plan_chunks
from data_prep.packing import pack_documents
from data_prep.sources import split_long

SPLITS = ("train", "val")
LANGUAGE_NAME = "language.json"


@dataclass
class Settings:
    seq_len: int
    patch_size: int
    val_fraction: float
    samples_per_shard: int
    inputs: list[str]
    val_inputs: list[str]
    num_shards: int
    tokenizer_sha256: str
    language_sha256: str | None = None      # the synthetic language copied into the output (task dir: language.json)


def task_dir(out: pathlib.Path, index: int, num_shards: int) -> pathlib.Path:
    return pathlib.Path(out) / ".work" / f"task-{index:05d}-of-{num_shards:05d}"


def is_val(text: str, fraction: float) -> bool:
    """Deterministic split by document content (duplicates land in the same split)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return h < fraction * 2.0**64


def iter_chunks(settings: Settings) -> Iterator[tuple[int, bool, tuple]]:
    """(chunk index, all-val?, chunk) over --input then --val-input."""
    c = 0
    for files, all_val in ((settings.inputs, False), (settings.val_inputs, True)):
        for chunk in plan_chunks(files) if files else ():
            yield c, all_val, chunk
            c += 1


_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_path: str | None, tokenizer: Tokenizer | None = None) -> None:
    """Set the process's tokenizer: `tokenizer` if given (in-process run), else load the file."""
    global _TOKENIZER
    os.environ["RAYON_NUM_THREADS"] = "1"
    _TOKENIZER = tokenizer or load_tokenizer(tokenizer_path)


def encode_chunk(job: tuple[int, bool, tuple, float, int]) -> tuple[int, dict, dict]:
    """Read and tokenize one chunk; returns (chunk, {split: packed uint32 tokens}, {split: stats})."""
    c, all_val, chunk, val_fraction, patch_size = job
    tok = _TOKENIZER
    by_split: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    text_bytes = dict.fromkeys(SPLITS, 0)
    for text in chunk_documents(chunk):
        split = "val" if all_val or is_val(text, val_fraction) else "train"
        pieces = split_long(text)
        ids = tok.encode_array(text) if len(pieces) == 1 else np.concatenate([tok.encode_array(p) for p in pieces])
        by_split[split].append(ids)
        text_bytes[split] += len(text.encode("utf-8", "surrogatepass"))
    packed, stats = {}, {}
    for split, arrays in by_split.items():
        packed[split] = pack_documents(arrays, tok.eos_id, tok.pad_id, patch_size)
        text_tokens = sum(map(len, arrays))
        stats[split] = {"documents": len(arrays), "text_bytes": text_bytes[split], "text_tokens": text_tokens,
                        "pad_tokens": len(packed[split]) - text_tokens - len(arrays)}
    return c, packed, stats


def run_task(out: pathlib.Path, settings: Settings, tokenizer: Tokenizer, shard_index: int,
             workers: int, language: bytes | None = None) -> pathlib.Path:
    """Encode this task's chunks into out/.work/task-I-of-N/ (with the language file, if any); returns that directory."""
    tdir = task_dir(out, shard_index, settings.num_shards)
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "task.json").unlink(missing_ok=True)
    tok_path = tokenizer.save(tdir / "tokenizer")
    if language is not None:
        (tdir / LANGUAGE_NAME).write_bytes(language)
    files = {s: open(tdir / f"{s}.bin", "wb") for s in SPLITS}
    chunks, totals = [], {s: collections.Counter() for s in SPLITS}

    def write(result):
        c, packed, stats = result
        for s in SPLITS:
            files[s].write(packed[s].data)
            totals[s].update(stats[s])
        chunks.append([c] + [len(packed[s]) for s in SPLITS])

    seen = [0]

    def my_jobs():
        for c, all_val, chunk in iter_chunks(settings):
            seen[0] = c + 1
            if c % settings.num_shards == shard_index:
                yield c, all_val, chunk, settings.val_fraction, settings.patch_size

    jobs = my_jobs()
    if workers <= 1:
        _init_worker(None, tokenizer)
        for job in jobs:
            write(encode_chunk(job))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tok_path),)) as pool:
            pending: collections.deque = collections.deque()
            for job in jobs:
                if len(pending) >= 2 * workers:
                    write(pending.popleft().get())
                pending.append(pool.apply_async(encode_chunk, (job,)))
            while pending:
                write(pending.popleft().get())
    for f in files.values():
        f.close()
    record = {"settings": asdict(settings), "shard_index": shard_index, "total_chunks": seen[0],
              "chunks": chunks, "stats": {s: dict(totals[s]) for s in SPLITS},
              "tokenizer_files": sorted(tokenizer.files), "tokenizer_main": tokenizer.main}
    tmp = tdir / "task.json.tmp"
    tmp.write_text(json.dumps(record, sort_keys=True))
    tmp.replace(tdir / "task.json")
    return tdir
