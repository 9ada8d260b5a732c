"""The chunks of a training split: the reference for "is this decoded chunk real?" and for the marginal.

A *real chunk* is a K-token chunk that occurs at a K-aligned position (0, K, 2K, ...) of a sequence
of the training split, among its first `limit` chunks in sample order (all of them when the split
is smaller; beyond the limit "real" means "seen in that prefix", a lower bound).  Pad tokens count
like any other token.  Membership is exact: each chunk is coded as the integer sum_k t_k V^k when
V^K < 2^63, else as a 64-bit polynomial hash with an odd multiplier (collisions then have
probability about n / 2^64 per query, n the number of distinct chunks).

The same chunks, drawn uniformly over positions, are samples of the training data's chunk marginal.
"""
from __future__ import annotations

import functools
import pathlib

import numpy as np
import torch

from calm_train.data.shards import read_split

DEFAULT_LIMIT = 1 << 22            # chunks (16M tokens at K = 4): 64 MiB of int32 tokens + 32 MiB of codes
HASH_MULTIPLIER = 0x9E3779B97F4A7C15     # odd: the polynomial hash is computed modulo 2^64 in uint64


def chunk_codes(chunks_NK: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int64 [...] code of each chunk [..., K] (exact below 2^63, see the module docstring)."""
    k = chunks_NK.shape[-1]
    exact = vocab_size ** k < 1 << 63
    tokens = chunks_NK.detach().cpu().numpy().astype(np.uint64)
    multiplier = np.uint64(vocab_size if exact else HASH_MULTIPLIER)
    offset = np.uint64(0 if exact else 1)
    code = np.zeros(tokens.shape[:-1], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(k):
            code = code * multiplier + tokens[..., i] + offset
    return torch.from_numpy(code.view(np.int64))


class ChunkPool:
    """K-aligned chunks [n, K] of a split, and their sorted distinct codes."""

    def __init__(self, chunks_NK: torch.Tensor, vocab_size: int, source: str = ""):
        if chunks_NK.ndim != 2 or len(chunks_NK) == 0:
            raise ValueError(f"ChunkPool: need a non-empty [n, K] tensor of chunks, got shape {tuple(chunks_NK.shape)}")
        self.chunks, self.vocab_size, self.source = chunks_NK, vocab_size, source
        self.codes = torch.unique(chunk_codes(chunks_NK, vocab_size))      # sorted

    @classmethod
    def from_split(cls, data_dir, split: str, patch_size: int, vocab_size: int, limit: int = DEFAULT_LIMIT) -> "ChunkPool":
        tokens = read_split(data_dir, split)
        chunks = tokens.reshape(-1, patch_size)[:limit]
        return cls(torch.from_numpy(chunks.astype(np.int32)), vocab_size, f"{pathlib.Path(data_dir)}/{split}")

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def distinct(self) -> int:
        return len(self.codes)

    def contains(self, chunks_NK: torch.Tensor) -> torch.Tensor:
        """bool [...]: whether each chunk [..., K] is a real chunk."""
        codes = chunk_codes(chunks_NK, self.vocab_size)
        at = torch.searchsorted(self.codes, codes).clamp_max(len(self.codes) - 1)
        return self.codes[at] == codes

    def draw(self, uniforms: torch.Tensor) -> torch.Tensor:
        """Chunks [..., K] at positions floor(u * n) for uniforms u in [0, 1): samples of the chunk marginal."""
        index = (uniforms.cpu().double() * len(self.chunks)).long().clamp_max(len(self.chunks) - 1)
        return self.chunks[index].to(uniforms.device).long()


@functools.lru_cache(maxsize=2)
def training_pool(data_dir: str, patch_size: int, vocab_size: int, limit: int = DEFAULT_LIMIT) -> ChunkPool:
    """The training split's pool, read once per process (evaluations during a run reuse it)."""
    return ChunkPool.from_split(data_dir, "train", patch_size, vocab_size, limit)
