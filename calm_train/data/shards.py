"""Read a split's samples straight from its MDS shards, in sample order (no StreamingDataset).

For evaluation over a whole split and for tests.  Shards are the fixed-size single-column MDS files
that prepare writes: header (uint32 count, uint32 offsets[count + 1], config) then raw uint32 rows.
"""
from __future__ import annotations

import pathlib

import numpy as np
import zstd

from calm_train.data.verify import read_index


def read_split(data_dir, split: str) -> np.ndarray:
    """[samples, seq_len] uint32 tokens of `split`."""
    split_dir = pathlib.Path(data_dir) / split
    rows = []
    for shard in read_index(split_dir)["shards"]:
        zipped = shard.get("zip_data")
        if zipped and (split_dir / zipped["basename"]).is_file():
            data = zstd.decompress((split_dir / zipped["basename"]).read_bytes())
        else:
            data = (split_dir / shard["raw_data"]["basename"]).read_bytes()
        n = int(np.frombuffer(data, np.uint32, 1)[0])
        offsets = np.frombuffer(data, np.uint32, n + 1, offset=4)
        rows.append(np.frombuffer(data[offsets[0]:offsets[-1]], np.uint32).reshape(n, shard["column_sizes"][0] // 4))
    return np.concatenate(rows)
