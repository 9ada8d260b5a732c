"""`--tokenizer train:VOCAB`: a byte-level BPE trained on the input with HF `tokenizers`, offline.

The result is a plain byte-level `tokenizer.json` (GPT-2 split pattern, no normalizer) with two special
tokens at the end, `<|endoftext|>` (EOS) and `<|pad|>` (PAD), so VOCAB counts them.  `load_tokenizer`
encodes it through tiktoken ranks (same ids, faster).  Training reads at most TRAIN_BYTES of text.
"""
from __future__ import annotations

import os
from typing import Iterator

from calm_train.data.dataset_info import DataError
from data_prep.sources import iter_documents

TRAIN_BYTES = 256 << 20
SPECIALS = ["<|endoftext|>", "<|pad|>"]


def parse_train_spec(spec: str) -> int | None:
    """VOCAB of a `train:VOCAB` spec, None for a tokenizer file."""
    if not spec.startswith("train:"):
        return None
    try:
        vocab = int(spec.split(":", 1)[1])
    except ValueError:
        vocab = -1
    if vocab < 256 + len(SPECIALS) + 1:
        raise DataError(f"--tokenizer {spec}: VOCAB must be an integer >= {256 + len(SPECIALS) + 1} "
                         "(256 bytes + specials + merges). Fix: e.g. train:8192")
    return vocab


def _capped(docs: Iterator[str], limit: int) -> Iterator[str]:
    size = 0
    for text in docs:
        yield text
        size += len(text)
        if size >= limit:
            return


def train_bpe(files: list[str], vocab_size: int) -> bytes:
    """tokenizer.json bytes of a byte-level BPE trained on the documents of `files`."""
    os.environ.setdefault("RAYON_NUM_THREADS", "1")     # one thread: deterministic and no oversubscription
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIALS), min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_capped(iter_documents(files), TRAIN_BYTES), trainer)
    tok.add_special_tokens(SPECIALS)
    return tok.to_str().encode("utf-8")
