"""Stage 2 of prepare (`--merge`): task token streams -> sequences -> MDS shards + dataset.json, written
into an empty directory (the staging area's `new`, data_prep.staging).

The tasks' chunks are put back in input order into one virtual token stream per split, cut into
samples of seq_len tokens (the last one filled with PAD).  Samples are grouped into fixed parts of
`samples_per_shard`; each part is one zstd MDS shard with xxh64 hashes, written by a pool of
processes into <split>/part-NNNNN/ (data_prep.mds), and the parts' indexes are merged into
<split>/index.json.
The layout depends only on the input and the settings, never on the number of workers or tasks.
"""
from __future__ import annotations

import json
import multiprocessing
import pathlib
import shutil

import numpy as np

from calm_train.data.dataset_info import DataError, DatasetInfo, write_dataset_info
from calm_train.data.tokenizer import Tokenizer, load_tokenizer
from data_prep.encode import LANGUAGE_NAME, SPLITS, task_dir
from data_prep.mds import write_shard
from data_prep.packing import TOKEN_DTYPE, cut_sequences


def read_tasks(out: pathlib.Path) -> list[dict]:
    """task.json of every task of the array, checked to be one complete, consistent run."""
    records = sorted((out / ".work").glob("task-*/task.json"))
    if not records:
        raise DataError(f"{out / '.work'}: no finished task (task-*/task.json). Fix: run prepare with "
                        "--shard-index I --num-shards N for every I first")
    tasks = [json.loads(p.read_text()) for p in records]
    n = tasks[0]["settings"]["num_shards"]
    have = sorted(t["shard_index"] for t in tasks if t["settings"]["num_shards"] == n)
    if have != list(range(n)) or len(tasks) != n:
        raise DataError(f"{out / '.work'}: tasks {have} of {n} finished (or tasks of another --num-shards "
                        "are mixed in). Fix: rerun the missing --shard-index values, or delete .work and start over")
    tasks.sort(key=lambda t: t["shard_index"])
    for t in tasks[1:]:
        if t["settings"] != tasks[0]["settings"] or t["total_chunks"] != tasks[0]["total_chunks"]:
            raise DataError(f"{task_dir(out, t['shard_index'], n)}: settings or input differ from task 0. "
                            "Fix: run every task with the same --input/--tokenizer/--seq-len/--patch-size")
    return tasks


def split_segments(out: pathlib.Path, tasks: list[dict], split: str) -> list[tuple[str, int, int]]:
    """(file, token offset, token count) of each chunk of `split`, in global chunk order."""
    col = 1 + SPLITS.index(split)
    n = len(tasks)
    by_chunk = {}
    for t in tasks:
        path, offset = str(task_dir(out, t["shard_index"], n) / f"{split}.bin"), 0
        for row in t["chunks"]:
            by_chunk[row[0]] = (path, offset, row[col])
            offset += row[col]
    if sorted(by_chunk) != list(range(tasks[0]["total_chunks"])):
        raise DataError(f"{out / '.work'}: chunks missing from the tasks' records. Fix: rerun prepare")
    return [by_chunk[c] for c in sorted(by_chunk) if by_chunk[c][2]]


def read_range(segments: list[tuple[str, int, int]], start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the concatenation of `segments`."""
    parts, pos = [], 0
    for path, offset, count in segments:
        lo, hi = max(start, pos), min(stop, pos + count)
        if lo < hi:
            parts.append(np.fromfile(path, dtype=TOKEN_DTYPE, count=hi - lo,
                                     offset=(offset + lo - pos) * TOKEN_DTYPE().itemsize))
        pos += count
    return np.concatenate(parts) if parts else np.zeros(0, TOKEN_DTYPE)


def write_part(job: tuple) -> dict:
    """Write samples [first, first + count) of a split as one MDS shard in `part_dir`; its index entry."""
    segments, part_dir, first, count, seq_len, pad_id = job
    tokens = read_range(segments, first * seq_len, (first + count) * seq_len)
    shutil.rmtree(part_dir, ignore_errors=True)
    return write_shard(part_dir, cut_sequences(tokens, seq_len, pad_id), count * (4 * seq_len + 8) + (1 << 16))


def merge_indexes(split_dir: pathlib.Path, part_dirs: list[str], entries: list[dict]) -> None:
    """<split>/index.json listing every part's shard, basenames relative to the split."""
    shards = []
    for part_dir, entry in zip(part_dirs, entries):
        part = pathlib.Path(part_dir).name
        shard = dict(entry)
        for key in ("raw_data", "zip_data"):
            shard[key] = dict(entry[key], basename=f"{part}/{entry[key]['basename']}")
        shards.append(shard)
    tmp = split_dir / "index.json.tmp"
    tmp.write_text(json.dumps({"version": 2, "shards": shards}, sort_keys=True))
    tmp.replace(split_dir / "index.json")


def write_split(out: pathlib.Path, split: str, segments, seq_len: int, pad_id: int, per_shard: int,
                workers: int) -> int:
    """Write one split's shards and merged index.json; returns its number of samples."""
    total = sum(s[2] for s in segments)
    samples = -(-total // seq_len)
    split_dir = out / split
    jobs = [(segments, str(split_dir / f"part-{p:05d}"), first, min(per_shard, samples - first), seq_len, pad_id)
            for p, first in enumerate(range(0, samples, per_shard))]
    if workers <= 1 or len(jobs) == 1:
        entries = [write_part(j) for j in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            entries = pool.map(write_part, jobs, chunksize=1)
    merge_indexes(split_dir, [j[1] for j in jobs], entries)
    return samples


def merge(work, out, workers: int = 1, tokenizer: Tokenizer | None = None) -> DatasetInfo:
    """Turn the finished tasks in work/.work into a prepared directory in `out` (an empty directory).

    `tokenizer`: the one the tasks used, when the caller has it loaded (else read from task 0).
    """
    work, out = pathlib.Path(work), pathlib.Path(out)
    tasks = read_tasks(work)
    st = tasks[0]["settings"]
    if tokenizer is None or tokenizer.sha256 != st["tokenizer_sha256"]:
        tok_dir = task_dir(work, 0, st["num_shards"]) / "tokenizer"
        tokenizer = load_tokenizer(tok_dir / tasks[0]["tokenizer_main"])
    tokenizer.save(out)
    stats = {s: {k: sum(t["stats"][s].get(k, 0) for t in tasks) for k in
                 ("documents", "text_bytes", "text_tokens", "pad_tokens")} for s in SPLITS}
    splits = {}
    for split in SPLITS:
        segments = split_segments(work, tasks, split)
        if not segments:
            continue
        samples = write_split(out, split, segments, st["seq_len"], tokenizer.pad_id, st["samples_per_shard"], workers)
        splits[split] = dict(stats[split], samples=samples, tokens=samples * st["seq_len"])
    if "train" not in splits:
        inputs = st["inputs"] + st["val_inputs"]
        named = ", ".join(inputs[:3]) + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")
        raise DataError(f"{named}: the input gave no training documents. Fix: check --input (empty files?) "
                        "and --val-fraction")
    info = DatasetInfo(
        vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
        patch_size=st["patch_size"], seq_len=st["seq_len"], tokenizer=tokenizer.main,
        tokenizer_sha256=tokenizer.sha256, tokenizer_files=sorted(tokenizer.files), splits=splits,
        documents=sum(s["documents"] for s in splits.values()),
        text_bytes=sum(s["text_bytes"] for s in splits.values()),
        samples_per_shard=st["samples_per_shard"], val_fraction=st["val_fraction"],
        inputs=st["inputs"] + st["val_inputs"])
    if st.get("language_sha256"):
        shutil.copyfile(task_dir(work, 0, st["num_shards"]) / LANGUAGE_NAME, out / LANGUAGE_NAME)
        info.language, info.language_sha256 = LANGUAGE_NAME, st["language_sha256"]
    write_dataset_info(out, info)
    return info
