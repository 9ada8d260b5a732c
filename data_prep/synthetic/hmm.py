"""A language's token stream, as `calm-train prepare` packs it, as a hidden Markov model; its exact predictions.

Hidden states: (word, syllable offset, node after the word) for every arc of the grammar, emitting that
syllable's token, plus EOS, PAD and END (the end of the split), emitting EOS, PAD and PAD.  Packing puts
EOS after each document and PAD up to the next multiple of K, so the transition out of EOS and PAD
depends on whether the next position is K-aligned (a new document starts there) or not (PAD):

    T_mid (next position not K-aligned), T_align (K-aligned), T[s, u] = P(state u next | state s).

The split's stream starts with a document; after its last document the split is filled with PAD up to
a whole sample (END, entered instead of a new document with prior probability END_PRIOR, so the filter
recognises the fill once it sees it and is otherwise unchanged within 1e-9).  Documents are i.i.d.: the
corpus writer draws the training and the held-out documents separately (data_prep/corpus.py).

A model sees one sample (a window of L tokens, starting at stream position j L).  The forward filter
over the window, from the state distribution at position j L (the chain run from the stream's start, no
observation), gives at every position t the exact predictive P(state_t | window[:t]), hence

* P(x_t | window[:t]) (the optimal next-token distribution; its log loss is the entropy per token),
* the optimal Brier-n at a chunk boundary: with P the distribution of the next n tokens, the expected
  Brier score of the truth, E_y[2 P(y) - sum_x P(x)^2] = sum_x P(x)^2 = a^T G_n a, a the predictive
  state distribution, G_n[s, s'] the probability that the chains started in s and s' emit the same n
  tokens:  G_1 = E (E[s, s'] = 1{s, s' emit the same token}),  G_n = E * (T G'_{n-1} T^T), with the T
  and the G' of the next position's phase (boundaries sit at phase 0; G' is the kernel one position on).
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings

import numpy as np
import torch

from data_prep.synthetic.language import Language, LanguageError

END_PRIOR = 1e-9
MAX_N = 4


def _sparse(rows, cols, vals, size: int) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor(np.array([rows, cols]), dtype=torch.long),
                                   torch.tensor(vals, dtype=torch.float64), (size, size),
                                   check_invariants=True).coalesce()


class TokenHMM:
    """The token process of `language` packed with K = patch_size; token ids from the prepared data."""

    def __init__(self, language: Language, patch_size: int, syllable_ids: list[int], eos_id: int, pad_id: int):
        self.patch_size = patch_size
        index: dict[tuple[int, int, int], int] = {}
        for node in language.nodes:
            for w, v, _ in node.arcs:
                for o in range(len(language.words[w])):
                    index.setdefault((w, o, v), len(index))
        self.num_word_states = n = len(index)
        self.eos, self.pad, self.end = n, n + 1, n + 2
        self.size = size = n + 3
        emit = np.empty(size, dtype=np.int64)
        rows, cols, vals = [], [], []
        for (w, o, v), s in index.items():
            word = language.words[w]
            emit[s] = syllable_ids[word[o]]
            if o + 1 < len(word):
                rows.append(s), cols.append(index[(w, o + 1, v)]), vals.append(1.0)
            else:
                for w2, v2, p in language.nodes[v].arcs:
                    rows.append(s), cols.append(index[(w2, 0, v2)]), vals.append(p)
                if language.nodes[v].end > 0:
                    rows.append(s), cols.append(self.eos), vals.append(language.nodes[v].end)
        emit[[self.eos, self.pad, self.end]] = [eos_id, pad_id, pad_id]
        self.emit = torch.from_numpy(emit)
        start = language.nodes[language.start]
        start_p = np.zeros(size)
        for w, v, p in start.arcs:
            start_p[index[(w, 0, v)]] += p / (1 - start.end)
        self.start = torch.from_numpy(start_p)
        tail = [(self.end, self.end, 1.0)]
        mid = tail + [(self.eos, self.pad, 1.0), (self.pad, self.pad, 1.0)]
        starts = [(s, u, (1 - END_PRIOR) * float(start_p[u])) for s in (self.eos, self.pad) for u in np.nonzero(start_p)[0]]
        align = tail + starts + [(s, self.end, END_PRIOR) for s in (self.eos, self.pad)]
        self.transitions = {}
        for name, extra in (("mid", mid), ("align", align)):
            r, c, x = zip(*extra)
            self.transitions[name] = _sparse(rows + list(r), cols + list(c), vals + list(x), size)
        self.transposed = {name: t.t().coalesce() for name, t in self.transitions.items()}

    def step_name(self, position: int) -> str:
        """The transition out of stream position `position`."""
        return "align" if (position + 1) % self.patch_size == 0 else "mid"

    # ---- the filter --------------------------------------------------------------------------------------
    def priors(self, num_windows: int, seq_len: int) -> torch.Tensor:
        """[S, W]: the state distribution at stream positions j * seq_len, j < num_windows, before any observation
        of the split (so without END: the split's end is recognised from its fill, not predicted)."""
        out = torch.empty(self.size, num_windows, dtype=torch.float64)
        p = self.start.clone()
        for j in range(num_windows):
            out[:, j] = p
            if j + 1 < num_windows:
                previous = p
                for t in range(j * seq_len, (j + 1) * seq_len):
                    p = torch.sparse.mm(self.transposed[self.step_name(t)], p[:, None])[:, 0]
                p[self.end] = 0
                p = p / p.sum()
                if float((p - previous).abs().sum()) < 1e-14:   # stationary from here on (seq_len % K == 0)
                    out[:, j + 1:] = p[:, None]
                    break
        return out

    def filter(self, tokens_WL: torch.Tensor, priors_SW: torch.Tensor, boundaries: list[int],
               first_window: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(x_t | window[:t]) [W, L], optimal Brier-n [W, len(boundaries), 4]) for windows that start at
        K-aligned stream positions.  A token the language cannot emit there raises LanguageError."""
        W, L = tokens_WL.shape
        kernels = [self.kernel(n) for n in range(1, MAX_N + 1)]
        a = priors_SW.clone()
        likelihood = torch.empty(W, L, dtype=torch.float64)
        optimum = torch.empty(W, len(boundaries), MAX_N, dtype=torch.float64)
        where = {t: i for i, t in enumerate(boundaries)}
        for t in range(L):
            if t in where:
                for n, g in enumerate(kernels):
                    optimum[:, where[t], n] = (torch.sparse.mm(g, a) * a).sum(0)
            a = a * (self.emit[:, None] == tokens_WL[None, :, t])
            c = a.sum(0)
            if bool((c <= 0).any()):
                j = int((c <= 0).nonzero()[0])
                raise LanguageError(f"sample {first_window + j}, position {t}: token {int(tokens_WL[j, t])} cannot "
                                    "occur there in this language: the data was not written by it (or with another "
                                    "K or tokenizer). Fix: prepare the corpus the language file came with")
            likelihood[:, t] = c
            a = torch.sparse.mm(self.transposed[self.step_name(t)], a / c)
        return likelihood, optimum

    # ---- the Brier kernels -------------------------------------------------------------------------------
    @functools.cache
    def kernel(self, n: int, phase: int = 0) -> torch.Tensor:
        """Sparse G_n for a first position at `phase` (module docstring); chunk boundaries sit at phase 0."""
        same = (self.emit[:, None] == self.emit[None, :]).to_sparse().double().coalesce()
        if n == 1:
            return same
        name = self.step_name(phase)
        with warnings.catch_warnings():       # torch's sparse @ sparse passes through its (beta) CSR code
            warnings.simplefilter("ignore", UserWarning)
            t_g = torch.sparse.mm(self.transitions[name], self.kernel(n - 1, (phase + 1) % self.patch_size))
            t_g_t = torch.sparse.mm(t_g, self.transposed[name])
        return (t_g_t * same).coalesce()


def boundaries(seq_len: int, patch_size: int) -> list[int]:
    """The positions calm-train eval scores: K, 2K, ... with the next MAX_N tokens inside the window."""
    return list(range(patch_size, seq_len - MAX_N + 1, patch_size))


@contextlib.contextmanager
def one_thread():
    """torch on one thread: these small sparse products gain nothing from more, and on a busy machine two
    threads ran them 20x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def predict_windows(hmm: TokenHMM, tokens_NL: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """Per window: the optimal Brier-n at each boundary [N, P, 4], the realised Brier score of the exact
    predictive 2 P(y) - sum P^2 [N, P, 4] (its mean estimates the same quantity: a check of the data against
    the language), and log P(x_t | window[:t]) [N, L]."""
    with one_thread():
        return _predict_windows(hmm, tokens_NL, batch)


def _predict_windows(hmm: TokenHMM, tokens_NL: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    if tokens_NL.shape[1] % hmm.patch_size:
        raise LanguageError(f"windows of {tokens_NL.shape[1]} tokens do not start at multiples of K={hmm.patch_size}")
    tokens = torch.from_numpy(tokens_NL.astype(np.int64))
    n_windows, seq_len = tokens.shape
    where = boundaries(seq_len, hmm.patch_size)
    priors = hmm.priors(n_windows, seq_len)
    optimum, realised, log_p = [], [], []
    for first in range(0, n_windows, batch):
        chunk = tokens[first:first + batch]
        likelihood, opt = hmm.filter(chunk, priors[:, first:first + batch], where, first)
        # P(y_i .. y_{i+n-1} | window[:i]) = prod of the one-step predictives
        cum = torch.cumprod(torch.stack([likelihood[:, [i + k for i in where]] for k in range(MAX_N)], -1), -1)
        optimum.append(opt), realised.append(2 * cum - opt), log_p.append(likelihood.log())
    return {"optimum": torch.cat(optimum).numpy(), "realised": torch.cat(realised).numpy(),
            "log_p": torch.cat(log_p).numpy()}


def entropy_bits(log_p_NL: np.ndarray) -> float:
    """Mean -log2 P(x_t | window[:t]) over positions 1..L-1: the optimal AR loss per token, in bits."""
    return float(-log_p_NL[:, 1:].mean() / math.log(2))
