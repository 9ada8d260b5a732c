"""Object-store URLs: which strings are URLs, their parts, and whether an installed client reads them.

A string `SCHEME://...` is a URL, never a local path (a path `s3:/...` made from one would write locally
what the user meant for a bucket).  The schemes are mosaicml-streaming's downloaders; each needs its
client library.  calm-train writes (prepare --out, remote checkpoints) to `s3://`: AWS S3 and every
S3-compatible store (MinIO, Ceph, R2, GCS's XML API) through `S3_ENDPOINT_URL`/`AWS_ENDPOINT_URL`.
"""
from __future__ import annotations

import importlib.util
import pathlib
import re

from calm_train.errors import UserError

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
# scheme -> (module that must import, the package that provides it); streaming downloads each of them
CLIENTS = {"s3": ("boto3", "boto3"), "gs": ("google.cloud.storage", "google-cloud-storage"), "oci": ("oci", "oci"),
           "azure": ("azure.storage.blob", "azure-storage-blob"),
           "azure-dl": ("azure.storage.filedatalake", "azure-storage-file-datalake"),
           "hf": ("huggingface_hub", "huggingface_hub"), "sftp": ("paramiko", "paramiko"),
           "dbfs": ("databricks.sdk", "databricks-sdk")}
WRITABLE = ("s3",)


class StorageError(UserError):
    """An object-store URL that cannot be used; the message names the URL and the fix."""


class Missing(StorageError):
    """No object at the URL."""


def is_url(spec) -> bool:
    return isinstance(spec, str) and URL.match(spec) is not None


def scheme(url: str) -> str:
    return URL.match(url).group(1).lower()


def bucket_and_key(url: str) -> tuple[str, str]:
    """s3://BUCKET/a/b -> ("BUCKET", "a/b")."""
    bucket, _, key = URL.match(url).group(2).partition("/")
    return bucket, key.strip("/")


def child(base, *parts: str) -> str:
    """base/part/...: a URL joined with '/', a local path with pathlib."""
    if is_url(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(pathlib.Path(base, *parts))


def name(spec) -> str:
    """The last part of a URL or path (a dataset's default name in a mixture)."""
    return spec.rstrip("/").rsplit("/", 1)[-1] if is_url(spec) else pathlib.Path(spec).name


def require_client(url: str, what: str, write: bool = False) -> None:
    """One line when no installed client handles the URL's scheme (or, for `write`, calm-train cannot write it)."""
    s = scheme(url)
    if s not in CLIENTS:
        raise StorageError(f"{what} {url}: no client reads {s}:// URLs (calm-train reads {', '.join(CLIENTS)}: "
                           "mosaicml-streaming's schemes). Fix: use one of those schemes, or a local directory")
    module, package = CLIENTS[s]
    if not _importable(module):
        raise StorageError(f"{what} {url}: the {s}:// client ({module}) is not installed. Fix: pip install {package}")
    if write and s not in WRITABLE:
        raise StorageError(f"{what} {url}: calm-train writes and lists objects (prepare --out, checkpoints) at "
                           f"{', '.join(f'{w}://' for w in WRITABLE)} only (any S3-compatible store, through "
                           "S3_ENDPOINT_URL). Fix: use an s3:// URL")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:             # a parent package is missing
        return False


def local_only(spec, what: str, fix: str = "give a local directory") -> None:
    """Refuse a URL where a local directory is needed (it would become a directory named 's3:')."""
    if is_url(spec):
        raise StorageError(f"{what} {spec} is a URL; a local directory is needed here. Fix: {fix}")
