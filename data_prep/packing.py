"""The CALM paper's packing: each document + EOS, padded with PAD to a multiple of K, concatenated,
then cut into sequences of seq_len tokens (a multiple of K).  Every document therefore starts at a
position that is a multiple of K inside its sequence, so no K-token patch straddles two documents.
"""
from __future__ import annotations

import numpy as np

TOKEN_DTYPE = np.uint32


def packed_length(n_tokens: int, patch_size: int) -> int:
    """Length of a document of n_tokens after EOS and PAD to a multiple of K."""
    return -(-(n_tokens + 1) // patch_size) * patch_size


def pack_documents(docs: list[np.ndarray], eos_id: int, pad_id: int, patch_size: int) -> np.ndarray:
    """Concatenate `docs` (uint32 arrays), each followed by EOS and PAD up to a multiple of K."""
    tails = [np.array([eos_id] + [pad_id] * pads, TOKEN_DTYPE) for pads in range(patch_size)]
    parts = []
    for doc in docs:
        parts += (doc, tails[-(len(doc) + 1) % patch_size])
    return np.concatenate(parts, dtype=TOKEN_DTYPE) if parts else np.zeros(0, TOKEN_DTYPE)


def cut_sequences(stream: np.ndarray, seq_len: int, pad_id: int) -> np.ndarray:
    """[n_samples, seq_len] view of `stream`; the last sample is filled up with PAD."""
    n = -(-len(stream) // seq_len)
    if n * seq_len != len(stream):
        stream = np.concatenate([stream, np.full(n * seq_len - len(stream), pad_id, dtype=stream.dtype)])
    return stream.reshape(n, seq_len)
