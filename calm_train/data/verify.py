"""Pre-flight check of a prepared directory: every shard's size and xxh64 against its index.json, and
the tokenizer against dataset.json (its hash, and no more tokens than dataset.json's vocab_size).

mosaicml-streaming hashes shards only when it downloads or decompresses them, and a bad shard then
gives silently wrong samples, a short epoch or a hang (notes/data_stack.md section 3).  Checking
before any StreamingDataset exists turns all of those into one DataError naming the file.  Data at a
URL is checked the same way, its shards against the bucket (data/remote.py).
"""
from __future__ import annotations

import json
import pathlib

from calm_train.data.dataset_info import DataError, DatasetInfo, dataset_dir, read_dataset_info
from calm_train.data.tokenizer import load_tokenizer
from calm_train.files import sha256_file, xxh64_file
from calm_train.storage.url import child, is_url

__all__ = ["DataError", "read_index", "verify_dataset", "verify_shards", "xxh64_file"]
FIX = "Fix: rerun `calm-train prepare` for this directory (or restore it from a good copy)"


def read_index(split_dir) -> dict:
    path = pathlib.Path(split_dir) / "index.json"
    if not path.is_file():
        raise DataError(f"{path}: missing. {FIX}")
    return parse_index(path.read_text(), path)


def parse_index(text: str, path) -> dict:
    try:
        index = json.loads(text)
        shards = index["shards"]
        assert isinstance(shards, list) and shards
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as err:
        raise DataError(f"{path}: not an MDS index with shards ({err!r}). {FIX}") from err
    return index


def check_form(path: pathlib.Path, form: dict, shown) -> None:
    """One shard file (its compressed or raw form, read from `path`, named `shown`) against index.json."""
    size = path.stat().st_size
    if size != form["bytes"]:
        raise DataError(f"{shown}: {size} bytes, index.json says {form['bytes']} "
                        f"({'truncated' if size < form['bytes'] else 'grown'}). {FIX}")
    want = form.get("hashes", {}).get("xxh64")
    if want is None:
        raise DataError(f"{shown}: index.json records no xxh64 hash for it. {FIX}")
    if xxh64_file(path) != want:
        raise DataError(f"{shown}: xxh64 checksum mismatch (corrupted bytes). {FIX}")


def check_index(index: dict, index_path, seq_len: int | None) -> int:
    """The shards' column sizes against seq_len; returns the split's sample count."""
    samples = 0
    for n, shard in enumerate(index["shards"]):
        samples += int(shard.get("samples", 0))
        if seq_len is not None and shard.get("column_sizes") != [4 * seq_len]:
            raise DataError(f"{index_path}: shard {n} holds samples of {shard.get('column_sizes')} bytes, "
                            f"not seq_len={seq_len} uint32 tokens ({4 * seq_len} bytes). {FIX}")
    return samples


def verify_shards(split_dir, seq_len: int | None = None) -> int:
    """Check each shard file of one split against index.json; returns the split's sample count.

    A shard counts as present in its compressed (`zip_data`) or raw form; each present form must match.
    """
    split_dir = pathlib.Path(split_dir)
    index_path = split_dir / "index.json"
    index = read_index(split_dir)
    samples = check_index(index, index_path, seq_len)
    for shard in index["shards"]:
        forms = [shard[k] for k in ("zip_data", "raw_data") if shard.get(k)]
        present = [f for f in forms if (split_dir / f["basename"]).is_file()]
        if not present:
            raise DataError(f"{split_dir / forms[0]['basename']}: shard file missing (listed in {index_path}). {FIX}")
        for form in present:
            check_form(split_dir / form["basename"], form, split_dir / form["basename"])
    return samples


def _verify_remote_shards(split_url: str, seq_len: int, hashes: bool) -> int:
    from calm_train.data.remote import read_text, verify_split
    index_url = child(split_url, "index.json")
    index = parse_index(read_text(index_url, FIX), index_url)
    samples = check_index(index, index_url, seq_len)
    verify_split(split_url, index, hashes, check_form)
    return samples


def verify_dataset(data_dir, splits: list[str] | None = None, remote_hashes: bool = True) -> DatasetInfo:
    """Verify dataset.json, the tokenizer file and every shard of the named (default: all) splits.

    A URL's shards are checked against the bucket's listing (present, their sizes) and, with `remote_hashes`,
    downloaded one at a time and hashed (without it, streaming checks each one's xxh64 as it downloads it)."""
    info = read_dataset_info(data_dir)
    info_path = child(data_dir, "dataset.json")
    tok, shown = dataset_dir(data_dir) / info.tokenizer, child(data_dir, info.tokenizer)
    if not tok.is_file():
        raise DataError(f"{shown}: tokenizer file missing (named in {info_path}). {FIX}")
    if sha256_file(tok) != info.tokenizer_sha256:
        raise DataError(f"{shown}: sha256 differs from {info_path} (tokenizer replaced or corrupted). {FIX}")
    tokens = load_tokenizer(tok).vocab_size
    if tokens > info.vocab_size:
        raise DataError(f"{info_path}: vocab_size={info.vocab_size} but its tokenizer {tok.name} has {tokens} "
                        f"tokens: ids up to {tokens - 1} can be in the shards, beyond the model's embedding. {FIX}")
    if info.seq_len % info.patch_size:
        raise DataError(f"{info_path}: seq_len={info.seq_len} is not a multiple of patch_size="
                        f"{info.patch_size}. {FIX}")
    for split in splits if splits is not None else sorted(info.splits):
        if split not in info.splits:
            raise DataError(f"{info_path}: no split '{split}' (has {sorted(info.splits)}). "
                            "Fix: prepare with --val-fraction or --val-input, or name an existing split")
        if is_url(data_dir):
            samples = _verify_remote_shards(child(data_dir, split), info.seq_len, remote_hashes)
        else:
            samples = verify_shards(pathlib.Path(data_dir) / split, info.seq_len)
        if samples != info.splits[split]["samples"]:
            raise DataError(f"{child(data_dir, split, 'index.json')}: {samples} samples, {info_path} says "
                            f"{info.splits[split]['samples']} (index mismatch). {FIX}")
    return info
