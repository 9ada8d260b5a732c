"""Weighted mixtures of prepared datasets through streaming's own Stream proportions: the weights show in
the samples read, a mixture is deterministic, resumes mid-epoch exactly (same and other dp size), and
datasets that do not share tokenizer, K and seq_len are refused naming both."""
import collections
import math

import numpy as np
import pytest
from pydoc_data import topics

from calm_train.data.dataset_info import DataError, read_dataset_info
from calm_train.data.mixing import mixture_tokenizer, read_mixture

BATCH = 4


def _mixture(a, b, wa=0.75, wb=0.25) -> str:
    return f"{a}@{wa},{b}@{wb}"


def _samples(data) -> int:
    return read_dataset_info(data).splits["train"]["samples"]


def test_weights_set_each_datasets_share_of_the_samples(rank_pool, prepared, prepared_b):
    n_a, n_b = _samples(prepared), _samples(prepared_b)
    epoch = n_a + n_b                                     # streaming keeps the epoch size, re-weights the streams
    runs = [rank_pool.run("dist_cases:one_epoch", 2, _mixture(prepared, prepared_b), 1, BATCH, 0) for _ in range(2)]
    assert runs[0] == runs[1]                             # deterministic for a seed
    ids = [i for rank in runs[0] for i, _ in rank]
    from_a = np.array([i < n_a for i in ids])             # sample ids run over dataset a, then b
    dropped = epoch - len(ids)                            # partial last batches are not yielded
    assert 0 <= dropped < 2 * BATCH
    assert abs(from_a.sum() - 0.75 * epoch) <= dropped + 1
    assert collections.Counter(i for i in ids if i < n_a).most_common(1)[0][1] >= 2   # a is repeated (0.75 > n_a/epoch)
    for prefix in (16, 64, len(ids) // 2):                # any prefix of the shuffled epoch: binomial error
        seen = np.concatenate([[i < n_a for i, _ in rank[:prefix // 2]] for rank in runs[0]])
        sigma = math.sqrt(0.75 * 0.25 / len(seen))
        assert abs(seen.mean() - 0.75) <= 3 * sigma, (prefix, seen.mean())


def test_mixture_resumes_mid_epoch_exactly_and_elastically(rank_pool, prepared, prepared_b):
    mixture = _mixture(prepared, prepared_b)
    whole = rank_pool.run("dist_cases:one_epoch", 2, mixture, 1, BATCH, 0)
    stop = 5
    first = rank_pool.run("dist_cases:first_part", 2, mixture, stop, BATCH, 0)
    state = first[0][1]
    assert first[0][1] == first[1][1] and state["sample_in_epoch"] == 2 * stop * BATCH
    same = rank_pool.run("dist_cases:rest_of_epoch", 2, mixture, state, BATCH, 0)
    for rank in range(2):                                 # same dp size: the uninterrupted sequence, sample by sample
        assert first[rank][0] + same[rank][0] == [i for i, _ in whole[rank]]
    elastic = rank_pool.run("dist_cases:rest_of_epoch", 1, mixture, state, BATCH, 0)
    resumed = collections.Counter(i for ids, _ in first for i in ids) + collections.Counter(elastic[0][0])
    assert resumed == collections.Counter(i for rank in whole for i, _ in rank)   # the same multiset of samples


def test_datasets_must_share_tokenizer_k_and_seq_len(prepared, prepared_b, prepare, tmp_path):
    sha, directory = mixture_tokenizer(_mixture(prepared, prepared_b))
    assert sha == read_dataset_info(prepared).tokenizer_sha256 and directory == prepared
    assert read_mixture(_mixture(prepared, prepared_b)).seq_len == read_dataset_info(prepared).seq_len
    docs = [topics.topics[name] for name in sorted(topics.topics)][:12]
    other_tokenizer = prepare(tmp_path, "other_tok", docs, "train:300")
    other_len = prepare(tmp_path, "other_len", docs, prepared / "tokenizer.json", seq_len=64)
    for other, what, theirs in ((other_tokenizer, "tokenizer sha256", read_dataset_info(other_tokenizer).tokenizer_sha256),
                                (other_len, "seq_len", 64)):
        with pytest.raises(DataError) as err:
            read_mixture(_mixture(prepared, other))
        message = str(err.value)
        assert "\n" not in message and what in message and str(prepared) in message and str(other) in message
        assert str(theirs) in message and "Fix:" in message
