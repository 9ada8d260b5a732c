"""The exact optimum of a prepared split drawn from a synthetic language (dataset.json names its language).

`split_optimum(DIR, "val")` runs the forward filter of data_prep/synthetic/hmm.py over every sample of
the split and keeps, per sample, the moment sums of the optimal Brier-n at the positions `calm-train
eval` scores (train/evaluate.py: chunk boundaries K, 2K, ... with four tokens after them), so the
optimum of any subset of samples (an evaluation's --max-tokens, an in-run evaluation's batches, a
data-parallel rank's share) has its mean and standard error over exactly the positions scored.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib

import numpy as np
import torch

from calm_train.data.dataset_info import DataError, read_dataset_info
from data_prep.synthetic.hmm import MAX_N, TokenHMM, entropy_bits, predict_windows
from data_prep.synthetic.language import SPECIALS, Language, LanguageError, read_language


@dataclasses.dataclass
class SplitOptimum:
    language: Language
    sums_N4: np.ndarray            # per sample: sum over its positions of the optimal Brier-1..4
    squares_N44: np.ndarray        # per sample: sum of their outer products
    positions: int                 # positions per sample
    realised_N4: np.ndarray        # per sample: sum of the realised Brier score of the exact predictive
    entropy_bits: float            # mean -log2 P(x_t | sample[:t]) over positions 1..L-1 of the split

    def sums(self, sample_ids) -> dict[str, torch.Tensor]:
        """Moment sums (train/moments.py layout, name "optimum") of the samples `sample_ids`."""
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        return {"optimum": torch.from_numpy(self.sums_N4[ids].sum(0)),
                "optimum_sq": torch.from_numpy(self.squares_N44[ids].sum(0)),
                "optimum_count": torch.tensor(float(len(ids) * self.positions), dtype=torch.float64)}


def load_language(data_dir) -> Language | None:
    """The language a prepared directory names (checked against its sha256 and tokenizer), or None."""
    data_dir = pathlib.Path(data_dir)
    info = read_dataset_info(data_dir)
    if info.language is None:
        return None
    path = data_dir / info.language
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != info.language_sha256:
        raise DataError(f"{path}: missing or not the file dataset.json names (sha256 {info.language_sha256}). "
                        "Fix: rerun `calm-train prepare` with the corpus's language file")
    try:
        language = read_language(path)
    except LanguageError as err:
        raise DataError(str(err)) from err
    if language.tokenizer_sha256() != info.tokenizer_sha256:
        raise DataError(f"{path}: the language's tokenizer is not the one {data_dir} was prepared with. Fix: prepare "
                        "with the corpus's own OUT.tokenizer.json")
    return language


def token_hmm(data_dir, language: Language) -> TokenHMM:
    info = read_dataset_info(data_dir)
    return TokenHMM(language, info.patch_size, [len(SPECIALS) + i for i in range(len(language.syllables))],
                    info.eos_id, info.pad_id)


@functools.lru_cache(maxsize=4)
def _split_optimum(data_dir: str, split: str, stamp: float) -> SplitOptimum | None:
    from calm_train.data.shards import read_split
    language = load_language(data_dir)
    if language is None:
        return None
    tokens = read_split(data_dir, split)
    try:
        out = predict_windows(token_hmm(data_dir, language), tokens)
    except LanguageError as err:
        raise DataError(f"{data_dir}/{split}: {err}") from err
    optimum = out["optimum"]                                           # [N, P, 4]
    return SplitOptimum(language, optimum.sum(1), np.einsum("npi,npj->nij", optimum, optimum), optimum.shape[1],
                        out["realised"].sum(1), entropy_bits(out["log_p"]))


def split_optimum(data_dir, split: str = "val") -> SplitOptimum | None:
    """The optimum of `split` of a prepared directory, or None when it names no language (computed once per
    process and directory)."""
    path = pathlib.Path(data_dir).resolve()
    return _split_optimum(str(path), split, (path / "dataset.json").stat().st_mtime)
