"""Corrupt shards: verify_dataset and the loader's pre-flight name the shard; the loader never hangs."""
import json
import shutil

import pytest

from calm_train.data.verify import DataError, verify_dataset

SHARD = "train/part-00002/shard.00000.mds.zstd"


def _flip(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _remove(path):
    path.unlink()


def _index_mismatch(path):
    index_path = path.parents[1] / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][2]["samples"] += 1
    index_path.write_text(json.dumps(index))


CASES = {"flipped": (_flip, "xxh64 checksum mismatch"), "truncated": (_truncate, "truncated"),
         "missing": (_remove, "shard file missing"), "index": (_index_mismatch, "index mismatch")}


@pytest.fixture
def broken(prepared, tmp_path, request):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    damage, _ = CASES[request.param]
    damage(data / SHARD)
    return data, request.param


@pytest.mark.parametrize("broken", sorted(CASES), indirect=True)
def test_verify_dataset_names_the_bad_shard(broken):
    data, case = broken
    with pytest.raises(DataError) as err:
        verify_dataset(data)
    text = str(err.value)
    assert CASES[case][1] in text and ("index.json" in text if case == "index" else SHARD in text)
    assert "Fix:" in text


def test_tokenizer_and_clean_dataset(prepared, tmp_path):
    info = verify_dataset(prepared)
    assert info.splits["train"]["samples"] % 16 == 0 and info.seq_len == 128 and info.patch_size == 4
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    (data / "tokenizer.json").write_text((data / "tokenizer.json").read_text().replace("<|pad|>", "<|pad2|>"))
    with pytest.raises(DataError, match="tokenizer.json: sha256 differs"):
        verify_dataset(data)


def test_loader_preflight_and_no_hang(rank_pool, prepared, tmp_path):
    flipped = tmp_path / "flipped"
    shutil.copytree(prepared, flipped)
    _flip(flipped / SHARD)
    # pre-flight on both ranks: the same DataError naming the shard, before any StreamingDataset exists
    for kind, text in rank_pool.run("dist_cases:expect_error", 2, str(flipped), 4, 0, 30, True):
        assert kind == "DataError" and SHARD in text and "xxh64" in text
    # without the pre-flight streaming's own hash check fails inside the epoch: an exception, not a
    # silent short epoch (0 workers) and not a hang (2 workers: the batch timeout fires)
    for workers in (0, 2):
        result = rank_pool.run("dist_cases:expect_error", 1, str(flipped), 4, workers, 10, False, timeout=180)[0]
        assert result is not None, f"workers={workers}: a corrupt shard went unnoticed"
        assert result[0] in ("DataError", "RuntimeError", "ValueError"), result
