"""Prepared data at a URL (`s3://BUCKET/PREFIX`): the same layout as a local directory, in a bucket.

    metadata_copy(URL)     dataset.json and the tokenizer files it names, downloaded into the local cache
                           (once per process): every reader of dataset.json and of the tokenizer reads this copy,
                           so the identity checks compare the same bytes as for a local copy of the data
    verify_split(URL/split)  index.json's shards against the bucket's listing (every shard present, its size), and with
                           `hashes` each shard downloaded and its xxh64 checked (`verify-data URL`)
    upload_prepared(DIR, URL)  `prepare --out URL`: the finished local output uploaded, dataset.json last, so a
                           half-uploaded dataset is never taken (readers need dataset.json first)

The shards themselves are streamed by mosaicml-streaming into `data.cache_dir` (data/loader.py), which
checks each shard's xxh64 as it downloads it.  The cache root is `CALM_TRAIN_CACHE`, else
`calm_train_cache` under the system temp dir (storage/objects.py).
"""
from __future__ import annotations

import pathlib
import tempfile

from calm_train.data.dataset_info import INFO_NAME, DataError, parse_dataset_info
from calm_train.storage import objects
from calm_train.storage.url import Missing, child, require_client

_copies: dict[str, pathlib.Path] = {}
FIX = "Fix: run `calm-train prepare ... --out URL` again (it uploads dataset.json last)"


def metadata_copy(url: str) -> pathlib.Path:
    """A local directory holding URL's dataset.json and tokenizer files (downloaded once per process)."""
    if url in _copies:
        return _copies[url]
    require_client(url, "data")
    root = objects.cache_dir("datasets", url)
    info_url = child(url, INFO_NAME)
    try:
        objects.download(info_url, root / INFO_NAME)
    except Missing as err:
        raise DataError(f"{info_url}: missing; {url} is not prepared data (or its upload did not finish: dataset.json "
                        "is uploaded last). Fix: run `calm-train prepare --input ... --tokenizer ... --out URL` and "
                        "point at URL") from err
    info = parse_dataset_info((root / INFO_NAME).read_text(), info_url)
    for name in dict.fromkeys([info.tokenizer, *info.tokenizer_files]):
        objects.download(child(url, name), root / name)
    _copies[url] = root
    return root


def verify_split(split_url: str, index: dict, hashes: bool, check_form) -> None:
    """Every shard form that index.json lists is in the bucket with its size; with `hashes`, downloaded and
    checked by `check_form(local path, form, shown)` (data/verify.py)."""
    present = objects.listing(split_url)
    for shard in index["shards"]:
        forms = [shard[k] for k in ("zip_data", "raw_data") if shard.get(k)]
        found = [f for f in forms if f["basename"] in present]
        if not found:
            raise DataError(f"{child(split_url, forms[0]['basename'])}: shard object missing (listed in "
                            f"{child(split_url, 'index.json')}). {FIX}")
        for form in found:
            shown = child(split_url, form["basename"])
            if present[form["basename"]] != form["bytes"]:
                raise DataError(f"{shown}: {present[form['basename']]} bytes, index.json says {form['bytes']}. {FIX}")
            if hashes:
                with tempfile.TemporaryDirectory() as tmp:
                    local = pathlib.Path(tmp) / "shard"
                    objects.download(shown, local)
                    check_form(local, form, shown)


def read_text(url: str, fix: str) -> str:
    """The text of a small object (an index.json); DataError naming it when it is not there."""
    try:
        return objects.get_bytes(url).decode()
    except Missing as err:
        raise DataError(f"{url}: missing. {fix}") from err


def upload_prepared(local: pathlib.Path, url: str, log) -> int:
    """Upload a finished prepare output to URL: every file, then dataset.json; returns the bytes uploaded.

    URL must be empty or hold calm-train data (a previous output, or the part of one that an interrupted upload
    left): its dataset.json is deleted first, so no reader takes the old dataset while its files are replaced."""
    present = objects.listing(url)
    ours = {INFO_NAME, *(p.name for p in local.iterdir() if p.is_file())}
    foreign = sorted(n for n in present if n.split("/")[0] not in ours | {"train", "val"})
    if foreign:
        raise DataError(f"--out {url} holds objects that are not prepared data ({foreign[:5]}). Fix: choose a new or "
                        "empty prefix (nothing is deleted there)")
    if INFO_NAME in present:
        objects.delete(url, [INFO_NAME])
        log(f"{url}: the previous dataset.json was deleted; its dataset is replaced")
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != INFO_NAME)
    for path in files:
        objects.upload(path, child(url, *path.relative_to(local).parts))
    objects.upload(local / INFO_NAME, child(url, INFO_NAME))
    kept = {str(p.relative_to(local)) for p in files} | {INFO_NAME}
    stale = sorted(n for n in present if n not in kept)
    if stale:
        objects.delete(url, stale)
    return sum(p.stat().st_size for p in files) + (local / INFO_NAME).stat().st_size
