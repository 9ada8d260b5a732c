"""Tokenizers: Llama 3 tiktoken file round trip, offline train:VOCAB, HF <-> tiktoken ids, save/load."""
import json

import pytest

from calm_train.data.dataset_info import DataError
from calm_train.data.tokenizer import PROBE, load_tokenizer
from data_prep.bpe import train_bpe
from data_prep.sources import split_long

TEXT = PROBE + " Continuous autoregressive language models compress K tokens into one vector.\n"


def test_llama3_tiktoken_round_trip(shared_data, tmp_path):
    tok = load_tokenizer(shared_data / "llama3_tokenizer" / "tokenizer.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (128256, 128000, 128001, 128002)
    assert tok.backend == "tiktoken"
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and ids[:4] == [791, 4062, 14198, 39935]
    assert tok.encode("<|end_of_text|>") != [tok.eos_id]        # special strings in text stay text
    wiki = json.loads((shared_data / "wikitext" / "wikitext_document_level-test.json").open().readline())["text"]
    assert tok.decode(tok.encode(wiki)) == wiki
    saved = load_tokenizer(tok.save(tmp_path / "copy"))
    assert saved.encode(TEXT) == ids and saved.sha256 == tok.sha256 and saved.pad_id == 128002


def test_train_vocab_offline_deterministic_and_fast_path_matches_hf(tmp_path):
    from pydoc_data import topics
    docs = [topics.topics[k] for k in sorted(topics.topics)][:40]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    first, second = train_bpe([str(src)], 700), train_bpe([str(src)], 700)
    assert first == second
    (tmp_path / "tokenizer.json").write_bytes(first)
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id) == (700, 698, 699, None)
    assert tok.backend == "tiktoken"
    hf = tok._hf
    for text in docs[:20] + [TEXT]:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text


def test_long_document_split_keeps_text():
    text = " ".join(f"w{i}" for i in range(25)) + "  tail\n\nend"
    pieces = split_long(text, max_words=10)
    assert "".join(pieces) == text and len(pieces) == 3
    assert all(len(p.split()) <= 10 for p in pieces) and all(p.startswith(" ") for p in pieces[1:])


def test_missing_special_tokens_is_a_clear_error(shared_data, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((shared_data / "llama3_tokenizer" / "tokenizer.model").read_bytes())
    with pytest.raises(DataError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path / "tokenizer.model")
