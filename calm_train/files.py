"""File helpers shared by every layer: digests (shard xxh64, tokenizer and checkpoint sha256), durable
writes (fsync a tree, replace a small file atomically), moving a path aside without overwriting anything,
and whether the process owning a file still runs."""
from __future__ import annotations

import datetime
import hashlib
import os
import pathlib

import xxhash


def file_digest(path, hasher, chunk: int = 1 << 22) -> str:
    """Hex digest of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            hasher.update(block)
    return hasher.hexdigest()


def sha256_file(path) -> str:
    return file_digest(path, hashlib.sha256())


def xxh64_file(path) -> str:
    return file_digest(path, xxhash.xxh64())


def fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: pathlib.Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Replace `path` by `text` in one step: a reader sees the old or the new file, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def move_aside(path: pathlib.Path, label: str) -> pathlib.Path:
    """Rename `path` to NAME.LABEL-<UTC> (with a counter if that exists: nothing is overwritten)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside, n = path.with_name(f"{path.name}.{label}-{stamp}"), 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.{label}-{stamp}-{n}"), n + 1
    os.replace(path, aside)
    return aside
