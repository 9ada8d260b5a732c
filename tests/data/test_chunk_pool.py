"""The training split's chunks: exact membership ("real chunk"), the hashed codes of large vocabularies, draws."""
import numpy as np
import torch

from calm_train.data.chunk_pool import ChunkPool, chunk_codes, training_pool
from calm_train.data.shards import read_split


def test_real_chunks_are_exactly_the_chunks_seen_in_the_pool():
    pool = ChunkPool(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4], [0, 0, 0, 9]]), vocab_size=10)
    assert len(pool) == 4 and pool.distinct == 3
    queries = torch.tensor([[[1, 2, 3, 4], [4, 3, 2, 1]],          # seen / the same tokens reversed
                            [[0, 0, 0, 9], [9, 0, 0, 0]],          # seen / a shift of it
                            [[5, 6, 7, 8], [5, 6, 7, 9]]])         # seen / one token off
    assert pool.contains(queries).tolist() == [[True, False], [True, False], [True, False]]
    assert pool.contains(queries).float().mean().item() == 0.5      # the real-chunk fraction of these six


def test_codes_are_exact_base_v_numbers_below_2_63_and_a_hash_above():
    chunks = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [2047, 2047, 2047, 2047]])
    assert chunk_codes(chunks, 2048).tolist() == [2048 ** 3, 2048 ** 2, 2048 ** 4 - 1]
    # Llama 3's vocabulary: V^4 > 2^63, so a 64-bit hash; still distinct for chunks differing in one place
    big = torch.tensor([[128255, 5, 5, 5], [5, 128255, 5, 5], [5, 5, 5, 128255], [0, 0, 0, 0], [0, 0, 0, 1]])
    assert len(set(chunk_codes(big, 128256).tolist())) == 5
    pool = ChunkPool(big[:3], vocab_size=128256)
    assert pool.contains(big).tolist() == [True, True, True, False, False]


def test_draws_follow_the_frequency_of_chunks_over_positions():
    chunks = torch.tensor([[1, 1, 1, 1]] * 5 + [[2, 2, 2, 2]] * 3 + [[3, 3, 3, 3]] * 2)
    pool = ChunkPool(chunks, vocab_size=4)
    drawn = pool.draw(torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(drawn[:, 0], minlength=4)[1:].float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.02, rtol=0)


def test_a_prepared_split_gives_its_k_aligned_chunks(tiny_data):
    tokens = read_split(tiny_data, "train")
    pool = training_pool(str(tiny_data), 4, 512)
    assert len(pool) == tokens.size // 4
    assert torch.equal(pool.chunks[:3], torch.from_numpy(tokens[0, :12].astype(np.int32)).view(3, 4))
    assert pool.contains(torch.from_numpy(tokens[:, 4:8].astype(np.int64))).all()
    assert ChunkPool.from_split(tiny_data, "train", 4, 512, limit=10).chunks.shape == (10, 4)
