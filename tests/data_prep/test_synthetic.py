"""Synthetic languages with a known answer: deterministic corpora, exact tokens, and an optimum that is computed.

The kernel identity sum_x P(x)^2 = a^T G_n a is checked against brute-force enumeration of every n-gram
(K = 1..4, so the EOS/PAD phases are exercised); the HMM against the data it describes: the realised Brier
score of the exact predictive, 2 P(y) - sum P^2, has the expected optimum as its mean, so on held-out text
their means agree within standard errors (a wrong state, transition or padding rule breaks this).
"""
import itertools
import json

import numpy as np
import pytest
import torch

from calm_train.data.dataset_info import DataError, read_dataset_info
from calm_train.data.shards import read_split
from calm_train.data.tokenizer import load_dataset_tokenizer
from data_prep.cli import main as prepare
from data_prep.corpus import main as corpus_main
from data_prep.packing import cut_sequences, pack_documents
from data_prep.synthetic.hmm import TokenHMM, boundaries, predict_windows
from data_prep.synthetic.language import SPECIALS, Language, LanguageError, read_language
from data_prep.synthetic.optimum import split_optimum
from data_prep.synthetic.rungs import LADDER, build, templates


def _hmm(language, k):
    return TokenHMM(language, k, [len(SPECIALS) + i for i in range(len(language.syllables))], 0, 1)


def _windows(language, k, seq_len, tokens):
    docs = [np.array(language.token_ids(d), dtype=np.uint32) for d in language.sample_documents(tokens)]
    return cut_sequences(pack_documents(docs, 0, 1, k), seq_len, 1)


def test_every_rung_builds_deterministically_with_a_prefix_free_lexicon():
    for rung in LADDER:
        language = build(rung, seed=3)
        assert language.to_json() == build(rung, seed=3).to_json()
        assert language.to_json() != build(rung, seed=4).to_json()
        spelled = sorted(map(tuple, language.words))
        assert not any(b[:len(a)] == a for a, b in zip(spelled, spelled[1:]))
    assert len(build("markov300:successors=3,words=100").words) == 100
    with pytest.raises(LanguageError, match="unknown rung"):
        build("nosuch")
    with pytest.raises(LanguageError, match="not key=value"):
        build("markov300:colour=3")


def test_corpus_cli_writes_the_language_its_tokenizer_and_exact_tokens(tmp_path, synthetic_data):
    out = tmp_path / "syn.jsonl"
    assert corpus_main([str(out), "--source", "synthetic:templates", "--seed", "1", "--tokens", "3000",
                        "--val-tokens", "500"]) == 0
    again = tmp_path / "again.jsonl"
    assert corpus_main([str(again), "--source", "synthetic:templates", "--seed", "1", "--tokens", "3000",
                        "--val-tokens", "500"]) == 0
    assert out.read_bytes() == again.read_bytes() and (tmp_path / "syn.val.jsonl").stat().st_size > 0
    language = read_language(tmp_path / "syn.language.json")
    assert language.rung == "templates" and language.seed == 1
    # prepared with its own tokenizer, the held-out split holds exactly the language's token ids + EOS + PAD
    info = read_dataset_info(synthetic_data)
    data_language = read_language(synthetic_data / info.language)
    tokenizer = load_dataset_tokenizer(synthetic_data)
    assert info.vocab_size % 16 == 0 and (tokenizer.eos_id, tokenizer.pad_id) == (0, 1)
    val_docs = [json.loads(line)["text"] for line in (synthetic_data.parent / "corpus.val.jsonl").read_text().splitlines()]
    first = tokenizer.encode(val_docs[0])
    stream = read_split(synthetic_data, "val").reshape(-1)
    assert list(stream[:len(first) + 1]) == first + [0]
    assert all(t >= len(SPECIALS) for t in first)
    assert tokenizer.decode(first) == val_docs[0] and data_language.to_json() == (synthetic_data / "language.json").read_text()


def test_prepare_attaches_the_language_only_with_its_own_tokenizer(tmp_path, capsys):
    corpus = tmp_path / "syn.jsonl"
    assert corpus_main([str(corpus), "--source", "synthetic:cycle", "--tokens", "2000", "--val-tokens", "400"]) == 0
    common = ["--input", str(corpus), "--seq-len", "16", "--patch-size", "4", "--val-fraction", "0.1"]
    assert prepare(common + ["--tokenizer", "train:300", "--out", str(tmp_path / "bpe")]) == 0
    assert read_dataset_info(tmp_path / "bpe").language is None and "is left out" in capsys.readouterr().err
    assert prepare(common + ["--tokenizer", str(tmp_path / "syn.tokenizer.json"), "--out", str(tmp_path / "own"),
                             "--language", str(tmp_path / "syn.language.json")]) == 0
    info = read_dataset_info(tmp_path / "own")
    assert info.language == "language.json" and len(info.language_sha256) == 64
    assert prepare(common + ["--tokenizer", str(tmp_path / "bpe" / "tokenizer.json"), "--out", str(tmp_path / "x"),
                             "--language", str(tmp_path / "syn.language.json")]) == 1
    assert "--language" in capsys.readouterr().err and not (tmp_path / "x").exists()
    (tmp_path / "own" / "language.json").write_text((tmp_path / "own" / "language.json").read_text().replace("0.1", "0.2"))
    with pytest.raises(DataError, match="not the file dataset.json names"):
        split_optimum(tmp_path / "own")


def _enumerated(hmm, a, n):
    """sum_x P(x)^2 over every n-gram x, P from the state distribution a at a boundary, by enumeration."""
    emit, a = hmm.emit.numpy(), a.numpy()
    steps = [hmm.transitions[hmm.step_name(t)].to_dense().numpy().T for t in range(n - 1)]
    total = 0.0
    for x in itertools.product(sorted(set(emit.tolist())), repeat=n):
        p = a * (emit == x[0])
        for t, token in enumerate(x[1:]):
            p = (steps[t] @ p) * (emit == token)
        total += p.sum() ** 2
    return total


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_kernel_equals_enumeration_of_every_ngram(k):
    parts = templates(np.random.default_rng(0), templates=("NOUN VERB",), scale=0.25, syllables=7, zipf=1.0, end=0.3)
    language = Language("two-slot", 0, "a sentence of two words", *parts)
    language.check()
    hmm = _hmm(language, k)
    generator = torch.Generator().manual_seed(k)
    for a in (torch.rand(hmm.size, generator=generator, dtype=torch.float64), hmm.start):
        a = a / a.sum()
        for n in range(1, 5):
            exact = float(a @ (hmm.kernel(n) @ a))
            assert exact == pytest.approx(_enumerated(hmm, a, n), rel=1e-9, abs=1e-12), (k, n)


@pytest.mark.parametrize("rung, k", [("cycle", 4), ("templates", 1), ("markov300", 2), ("templates_x3", 3)])
def test_realised_score_of_the_exact_predictive_averages_to_the_optimum(rung, k):
    language = build(rung, seed=0)
    windows = _windows(language, k, 48, 30_000)
    out = predict_windows(_hmm(language, k), windows)
    assert out["optimum"].shape == (len(windows), len(boundaries(48, k)), 4)
    optimum, realised = out["optimum"].reshape(-1, 4), out["realised"].reshape(-1, 4)
    difference = realised - optimum
    z = difference.mean(0) / (difference.std(0) / np.sqrt(len(difference)))
    assert (np.abs(z) < 3.5).all(), (rung, k, z)
    assert (optimum > 0).all() and (np.diff(optimum.mean(0)) < 0).all()    # longer n-grams are harder


def test_split_optimum_sums_cover_exactly_the_scored_positions(synthetic_data):
    optimum = split_optimum(synthetic_data)
    info = read_dataset_info(synthetic_data)
    assert len(optimum.sums_N4) == info.splits["val"]["samples"] and optimum.positions == len(boundaries(32, 4))
    sums = optimum.sums([0, 2])
    assert float(sums["optimum_count"]) == 2 * optimum.positions
    assert torch.allclose(sums["optimum"], torch.from_numpy(optimum.sums_N4[0] + optimum.sums_N4[2]))
    mean = optimum.sums_N4.sum(0) / (len(optimum.sums_N4) * optimum.positions)
    assert 0.3 < mean[0] < 0.7 and 0 < mean[3] < mean[0] and 1 < optimum.entropy_bits < 2.5
    assert split_optimum(synthetic_data) is optimum                      # computed once per process
