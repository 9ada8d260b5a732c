"""data_prep.mds writes the same bytes as streaming's MDSWriter (the loader tests read them back)."""
import json

import numpy as np
import pytest

from data_prep.mds import shard_config, write_shard


@pytest.mark.parametrize("n, seq_len", [(1, 8), (7, 32)])
def test_shard_and_index_bytes_equal_mdswriter(tmp_path, n, seq_len):
    from streaming import MDSWriter

    rows = np.random.default_rng(n).integers(0, 2**32, size=(n, seq_len), dtype=np.uint32)
    limit = n * (4 * seq_len + 8) + (1 << 16)
    with MDSWriter(out=str(tmp_path / "ref"), columns={"tokens": f"ndarray:uint32:{seq_len}"},
                   compression="zstd", hashes=["xxh64"], size_limit=limit) as writer:
        for row in rows:
            writer.write({"tokens": row})
    entry = write_shard(tmp_path / "ours", rows, limit)
    for name in ("shard.00000.mds.zstd", "index.json"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    config_bytes = len(json.dumps(shard_config(seq_len, limit), sort_keys=True))
    assert entry["samples"] == n
    assert entry["raw_data"]["bytes"] == 4 + 4 * (n + 1) + config_bytes + 4 * seq_len * n


def test_shard_over_size_limit_is_refused(tmp_path):
    with pytest.raises(ValueError, match="exceed the shard size limit 100"):
        write_shard(tmp_path / "p", np.zeros((4, 16), np.uint32), 100)
