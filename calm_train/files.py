"""File digests shared by shard verification, tokenizer records and checkpoint manifests."""
from __future__ import annotations

import hashlib

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
