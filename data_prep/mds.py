"""One MDS shard of fixed-size uint32 samples, byte for byte what streaming's `MDSWriter` writes.

`MDSWriter(columns={"tokens": "ndarray:uint32:S"}, compression="zstd", hashes=["xxh64"],
size_limit=L)` given samples that fit under L writes one joint shard and an index.json:
    shard.00000.mds = uint32 n | uint32 offsets[n + 1] | config JSON | n rows of S uint32
    shard.00000.mds.zstd = zstd level 3 of it (the raw file is not kept)
    index.json = {"shards": [config + samples + raw_data/zip_data {basename, bytes, hashes}], "version": 2}
Writing it directly avoids `import streaming` (torch + transformers, ~5 CPU s per process) and the
per-sample Python loop; tests/data_prep/test_mds.py checks the bytes against MDSWriter itself.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import xxhash
import zstd

ZSTD_LEVEL = 3                        # streaming's default for compression="zstd"
SHARD_NAME = "shard.00000.mds"


def shard_config(seq_len: int, size_limit: int) -> dict:
    return {"column_encodings": [f"ndarray:uint32:{seq_len}"], "column_names": ["tokens"],
            "column_sizes": [4 * seq_len], "compression": "zstd", "format": "mds", "hashes": ["xxh64"],
            "size_limit": size_limit, "version": 2}


def _file_info(basename: str, data) -> dict:
    return {"basename": basename, "bytes": len(data), "hashes": {"xxh64": xxhash.xxh64(data).hexdigest()}}


def write_shard(part_dir, samples_NS: np.ndarray, size_limit: int) -> dict:
    """Write `samples_NS` (uint32 [n, seq_len]) as part_dir/shard.00000.mds.zstd + index.json.

    Returns the shard's index entry.  `size_limit` is recorded as MDSWriter records it and must
    hold the whole shard (prepare sizes it so).
    """
    n, seq_len = samples_NS.shape
    config = shard_config(seq_len, size_limit)
    config_bytes = json.dumps(config, sort_keys=True).encode("utf-8")
    header = 4 + 4 * (n + 1) + len(config_bytes)
    if header + samples_NS.nbytes > size_limit:       # MDSWriter's rule: else it starts a 2nd shard
        raise ValueError(f"{part_dir}: {n} samples of {seq_len} tokens exceed the shard size limit {size_limit}")
    offsets = header + np.arange(n + 1, dtype=np.int64) * (4 * seq_len)
    raw = b"".join([np.uint32(n).tobytes(), offsets.astype(np.uint32).tobytes(), config_bytes,
                    np.ascontiguousarray(samples_NS, dtype=np.uint32).data])
    zipped = zstd.compress(raw, ZSTD_LEVEL)
    part_dir = pathlib.Path(part_dir)
    part_dir.mkdir(parents=True, exist_ok=True)
    (part_dir / f"{SHARD_NAME}.zstd").write_bytes(zipped)
    entry = dict(config, samples=n, raw_data=_file_info(SHARD_NAME, raw),
                 zip_data=_file_info(f"{SHARD_NAME}.zstd", zipped))
    (part_dir / "index.json").write_text(json.dumps({"version": 2, "shards": [entry]}, sort_keys=True))
    return entry
