"""`dataset.json`: what `calm-train prepare` wrote and what training reads from it.

Layout of a prepared directory (or of a prefix in a bucket, `s3://BUCKET/PREFIX`: data/remote.py):
    DIR/dataset.json                 this record
    DIR/<tokenizer files>            tokenizer.json, or tokenizer.model + tokenizer_config.json
    DIR/<split>/index.json           MDS index of the split (train, val)
    DIR/<split>/part-NNNNN/shard.00000.mds.zstd   one shard per part; column `tokens`: uint32[seq_len]
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from dataclasses import dataclass, field

from calm_train.errors import UserError
from calm_train.storage.url import child, is_url

INFO_NAME = "dataset.json"
FORMAT_VERSION = 1


class DataError(UserError):
    """A prepared data directory that cannot be used; the message names the file and the fix."""


@dataclass
class DatasetInfo:
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None
    patch_size: int                 # K: every document starts at a multiple of K
    seq_len: int                    # tokens per sample, a multiple of K
    tokenizer: str                  # file name in the data directory (the hashed one)
    tokenizer_sha256: str
    tokenizer_files: list[str]      # every file of the tokenizer (copied together)
    splits: dict[str, dict]         # name -> {"samples", "tokens", "documents", "text_tokens", "pad_tokens"}
    documents: int                  # input documents over all splits
    text_bytes: int                 # UTF-8 bytes of input text
    samples_per_shard: int
    val_fraction: float
    inputs: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"


def write_dataset_info(data_dir, info: DatasetInfo) -> pathlib.Path:
    path = pathlib.Path(data_dir) / INFO_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(info.to_json())
    tmp.replace(path)
    return path


def dataset_dir(data_dir) -> pathlib.Path:
    """The local directory that holds DIR's dataset.json and tokenizer files: DIR itself, or for a URL their
    copy in the local cache (data/remote.py)."""
    if is_url(data_dir):
        from calm_train.data.remote import metadata_copy
        return metadata_copy(data_dir)
    return pathlib.Path(data_dir)


def read_dataset_info(data_dir) -> DatasetInfo:
    """dataset.json of a prepared directory or URL."""
    path = dataset_dir(data_dir) / INFO_NAME
    if not path.is_file():
        raise DataError(f"{path}: missing; {data_dir} is not a prepared data directory. "
                        "Fix: run `calm-train prepare --input ... --tokenizer ... --out DIR` and point at DIR")
    return parse_dataset_info(path.read_text(), child(data_dir, INFO_NAME))


def parse_dataset_info(text: str, path: str) -> DatasetInfo:
    """The text of a dataset.json (read from `path`, which errors name), checked."""
    try:
        tree = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}). Fix: rerun `calm-train prepare`") from err
    names = {f.name for f in dataclasses.fields(DatasetInfo)}
    missing = sorted(n for n in names if n not in tree and n not in ("inputs", "format_version"))
    if missing:
        raise DataError(f"{path}: missing keys {missing}. Fix: rerun `calm-train prepare` with this version")
    info = DatasetInfo(**{k: v for k, v in tree.items() if k in names})
    for name in [info.tokenizer, *info.tokenizer_files]:
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise DataError(f"{path}: {name!r} is not a plain file name (dataset.json names files beside it; "
                            "a path could read or write elsewhere). Fix: rerun `calm-train prepare`")
    specials = {"eos_id": info.eos_id, "pad_id": info.pad_id, "bos_id": info.bos_id}
    outside = {k: v for k, v in specials.items() if v is not None and not 0 <= v < info.vocab_size}
    if outside:
        raise DataError(f"{path}: {outside} outside the vocabulary of vocab_size={info.vocab_size}. "
                        "Fix: rerun `calm-train prepare`")
    return info
