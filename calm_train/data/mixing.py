"""Weighted mixtures of prepared datasets: `data.train` as one directory or [{path, weight, name}, ...].

Every dataset of a mixture must share the tokenizer (sha256 in dataset.json), K and the sequence
length: they are compared before anything starts, and a difference is one line naming both
directories and both values.  The samples are drawn by mosaicml-streaming itself (one `Stream` per
dataset, `proportion` = weight / sum of weights: a dataset is repeated or subsampled so that its share
of each epoch is its weight); `TokenLoader` builds the streams, this module only reads and checks.
"""
from __future__ import annotations

import pathlib

import numpy as np

from calm_train.config import DataSource, data_sources
from calm_train.data.dataset_info import DataError, DatasetInfo, dataset_dir, read_dataset_info

SHARED = (("tokenizer_sha256", "tokenizer sha256"), ("patch_size", "K (patch_size)"), ("seq_len", "seq_len"))


def as_sources(data) -> list[DataSource]:
    """A directory, a data.train value, or a list of DataSource: the datasets, each with its name."""
    if isinstance(data, pathlib.Path):
        data = str(data)
    return data_sources(data)


def read_mixture(data) -> DatasetInfo:
    """dataset.json of the first dataset, after checking that every dataset agrees with it."""
    sources = as_sources(data)
    if not sources:
        raise DataError("config key 'data.train' is empty. Fix: set data.train=DIR of `calm-train prepare --out DIR`")
    first = read_dataset_info(sources[0].path)
    for source in sources[1:]:
        info = read_dataset_info(source.path)
        for key, what in SHARED:
            ours, theirs = getattr(first, key), getattr(info, key)
            if ours != theirs:
                raise DataError(f"data.train mixes datasets of different {what}: {sources[0].path} has {ours}, "
                                f"{source.path} has {theirs}. Fix: prepare every dataset of a mixture with the same "
                                "tokenizer, --patch-size and --seq-len")
    return first


def mixture_tokenizer(data) -> tuple[str, pathlib.Path]:
    """(sha256, local directory holding the tokenizer files) of a mixture's one shared tokenizer."""
    info = read_mixture(data)
    return info.tokenizer_sha256, dataset_dir(as_sources(data)[0].path)


def proportions(sources: list[DataSource]) -> list[float] | None:
    """Each dataset's share of an epoch (None for a single dataset: every sample once per epoch)."""
    if len(sources) == 1:
        return None
    total = sum(s.weight for s in sources)
    return [s.weight / total for s in sources]


def count_per_source(sample_ids, sample_offsets: np.ndarray) -> np.ndarray:
    """How many of `sample_ids` (global ids over the concatenated datasets) fall in each dataset."""
    which = np.searchsorted(sample_offsets, np.asarray(sample_ids), side="right") - 1
    return np.bincount(which, minlength=len(sample_offsets))
