"""One tokenizer interface over HF `tokenizers` files and tiktoken BPE files.

`load_tokenizer(path)` accepts
  * a `tokenizer.json` (HF tokenizers).  A plain byte-level BPE (what `train:VOCAB` produces) is
    converted to tiktoken ranks for encoding, which gives the same ids 3-5x faster; the conversion is
    checked on a probe text and skipped when the ids differ;
  * a tiktoken BPE file (`base64(token) rank` lines, e.g. Llama 3's `tokenizer.model`) with its special
    tokens read from `tokenizer_config.json` (`added_tokens_decoder`, `eos_token`, `bos_token`,
    `pad_token`, and our own `pat_str`) or `special_tokens_map.json` beside it;
  * a directory holding one of those (`tokenizer.json` first).

Special ids: EOS is required.  PAD is the tokenizer's pad token when it has one, else the first
`<|reserved_special_token_N|>` (Llama 3: `<|reserved_special_token_0|>` = 128002), else EOS.
"""
from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import re

import numpy as np
import tiktoken

from calm_train.data.dataset_info import DataError

# Llama 3's split pattern; the default for a tiktoken file that does not name its own.
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-2's pattern: what the HF ByteLevel pre-tokenizer (use_regex=True) splits with.
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|bos|>")
PAD_NAMES = ("<|pad|>", "<pad>", "<|finetune_right_pad_id|>", "[PAD]")
CONFIG_NAME = "tokenizer_config.json"
PROBE = ("The quick brown fox's 12345 jumps -- over\n\n  the lazy dog.\tCafé ünïcode 東京 🙂 "
         "it'll   end\r\nhere...")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    """encode/decode plus the special ids that packing and training need."""

    def __init__(self, files: dict[str, bytes], main: str, special: dict[str, int], eos_id: int,
                 pad_id: int, bos_id: int | None, vocab_size: int, encoding: tiktoken.Encoding | None,
                 hf=None):
        self.files, self.main = files, main            # what save() writes; main is the hashed file
        self.special = special
        self.eos_id, self.pad_id, self.bos_id = eos_id, pad_id, bos_id
        self.vocab_size = vocab_size
        self._enc, self._hf = encoding, hf

    @property
    def backend(self) -> str:
        return "tiktoken" if self._enc is not None else "tokenizers"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.files[self.main]).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with special-token strings treated as plain text (no BOS/EOS added)."""
        if self._enc is not None:
            return self._enc.encode_ordinary(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """encode(text) as uint32 (tiktoken fills the array directly: no Python ints in between)."""
        if self._enc is not None:
            return self._enc.encode_to_numpy(text, disallowed_special=())
        return np.asarray(self.encode(text), dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Single-threaded batch encode (prepare parallelises over processes)."""
        if self._enc is not None:
            return [self._enc.encode_ordinary(t) for t in texts]
        return [e.ids for e in self._hf.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._enc is not None:
            return self._enc.decode_bytes(ids).decode("utf-8", errors="replace")
        return self._hf.decode(ids, skip_special_tokens=False)

    def save(self, directory) -> pathlib.Path:
        """Write the tokenizer's files into `directory`; returns the path of the main file."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            tmp = directory / f".{name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(directory / name)
        return directory / self.main


def load_tokenizer(path_or_spec) -> Tokenizer:
    path = pathlib.Path(path_or_spec)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise DataError(f"{path}: no tokenizer.json or tokenizer.model in this directory. "
                        "Fix: pass the tokenizer file itself")
    if not path.is_file():
        raise DataError(f"tokenizer {path} does not exist. Fix: pass a tokenizer.json, a tiktoken "
                        "BPE file (e.g. Llama 3's tokenizer.model) or train:VOCAB to prepare")
    data = path.read_bytes()
    if data.lstrip()[:1] == b"{":
        return _load_hf(path, data)
    return _load_tiktoken(path, data)


def _pick(names, special: dict[str, int], wanted: str | None) -> int | None:
    if wanted is not None:
        return special.get(wanted)
    for name in names:
        if name in special:
            return special[name]
    return None


def _special_ids(special: dict[str, int], config: dict, path) -> tuple[int, int, int | None]:
    def named(key):
        value = config.get(key)
        return value.get("content") if isinstance(value, dict) else value
    eos = _pick(EOS_NAMES, special, named("eos_token"))
    if eos is None:
        raise DataError(f"{path}: no end-of-text token among its special tokens {sorted(special)[:8]}. "
                         f"Fix: add one of {EOS_NAMES} or set eos_token in {CONFIG_NAME} beside it")
    bos = _pick(BOS_NAMES, special, named("bos_token"))
    pad = _pick(PAD_NAMES, special, named("pad_token"))
    if pad is None:
        reserved = sorted((i, s) for s, i in special.items() if re.fullmatch(r"<\|reserved_special_token_\d+\|>", s))
        pad = reserved[0][0] if reserved else eos
    return eos, pad, bos


def _load_tiktoken(path: pathlib.Path, data: bytes) -> Tokenizer:
    ranks = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as err:
            raise DataError(f"{path}:{n}: not a tiktoken BPE line ('base64 rank'): {line[:60]!r}. "
                             "Fix: pass a tokenizer.json or a tiktoken BPE file") from err
    config_path = path.parent / CONFIG_NAME
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    special = {v["content"]: int(k) for k, v in config.get("added_tokens_decoder", {}).items()}
    map_path = path.parent / "special_tokens_map.json"
    if not special and map_path.is_file():
        raise DataError(f"{config_path}: missing; {map_path.name} names special tokens but not their ids. "
                         f"Fix: put the tokenizer's {CONFIG_NAME} (with added_tokens_decoder) beside {path}")
    if not special:
        raise DataError(f"{path}: a tiktoken file carries no special tokens and {config_path} is absent. "
                         f"Fix: put a {CONFIG_NAME} with added_tokens_decoder and eos_token beside it")
    eos, pad, bos = _special_ids(special, config, path)
    pat = config.get("pat_str", LLAMA3_PAT)
    enc = tiktoken.Encoding(name=f"calm-{hashlib.sha256(data).hexdigest()[:12]}", pat_str=pat,
                            mergeable_ranks=ranks, special_tokens=special)
    saved = {k: config[k] for k in ("bos_token", "eos_token", "pad_token") if k in config}
    saved.update(pat_str=pat, pad_token=_name_of(special, pad), eos_token=_name_of(special, eos),
                 added_tokens_decoder={str(i): {"content": s, "special": True}
                                       for s, i in sorted(special.items(), key=lambda kv: kv[1])})
    files = {"tokenizer.model": data, CONFIG_NAME: (json.dumps(saved, indent=1, sort_keys=True) + "\n").encode()}
    return Tokenizer(files, "tokenizer.model", special, eos, pad, bos, enc.max_token_value + 1, enc)


def _name_of(special: dict[str, int], token_id: int) -> str:
    return next(s for s, i in special.items() if i == token_id)


def _load_hf(path: pathlib.Path, data: bytes) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_str(data.decode("utf-8"))
    except Exception as err:        # noqa: BLE001 - tokenizers raises its own exception type for any bad file
        raise DataError(f"{path}: not a valid tokenizer.json ({err}). Fix: pass an intact tokenizer.json, a "
                        "tiktoken BPE file or train:VOCAB") from err
    special = {t.content: i for i, t in hf.get_added_tokens_decoder().items()}
    config_path = path.parent / CONFIG_NAME
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    eos, pad, bos = _special_ids(special, config, path)
    enc = _hf_as_tiktoken(json.loads(data), special)
    if enc is not None and enc.encode_ordinary(PROBE) != hf.encode(PROBE, add_special_tokens=False).ids:
        enc = None
    return Tokenizer({"tokenizer.json": data}, "tokenizer.json", special, eos, pad, bos,
                     hf.get_vocab_size(with_added_tokens=True), enc, hf)


def _hf_as_tiktoken(spec: dict, special: dict[str, int]) -> tiktoken.Encoding | None:
    """tiktoken ranks for a plain byte-level BPE tokenizer.json; None for anything else."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    plain = (model.get("type") == "BPE" and not model.get("byte_fallback") and model.get("dropout") is None
             and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
             and spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
             and pre.get("use_regex", True) and not pre.get("add_prefix_space", False))
    if not plain:
        return None
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    try:
        ranks = {bytes(to_byte[c] for c in token): i for token, i in model["vocab"].items()
                 if token not in special}
    except KeyError:
        return None
    if len(ranks) < 256:
        return None
    return tiktoken.Encoding(name="calm-hf-bpe", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens=special)



def load_dataset_tokenizer(directory) -> Tokenizer:
    """The tokenizer that a prepared data directory or URL (or a run's tokenizer/) names in its dataset.json."""
    from calm_train.data.dataset_info import dataset_dir, read_dataset_info
    return load_tokenizer(dataset_dir(directory) / read_dataset_info(directory).tokenizer)
