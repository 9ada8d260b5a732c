"""Objects at URLs: read any scheme that mosaicml-streaming reads; list, write and delete s3:// (boto3).

The boto3 client is built from its own environment and config files: the endpoint is `S3_ENDPOINT_URL`
(what streaming reads) or else boto3's own `AWS_ENDPOINT_URL`/`~/.aws/config`; credentials, region and
profile are boto3's.  Requests are retried by botocore (standard mode: connection errors, throttling,
5xx), and a failure becomes one StorageError naming the URL and the fix: a missing bucket or object, a
denied request, an unreachable endpoint, missing credentials.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import threading

from calm_train.storage.url import Missing, StorageError, bucket_and_key, child, require_client, scheme

CREDENTIALS = ("credentials come from boto3's environment: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
               "or ~/.aws/credentials")
_client, _client_lock = None, threading.Lock()


def cache_dir(kind: str, url: str) -> pathlib.Path:
    """CACHE/KIND/<sha256 of the URL>: one local directory per URL; CACHE is `CALM_TRAIN_CACHE`, else
    `calm_train_cache` under the system temp dir."""
    import hashlib
    import tempfile
    root = os.environ.get("CALM_TRAIN_CACHE") or pathlib.Path(tempfile.gettempdir()) / "calm_train_cache"
    return pathlib.Path(root) / kind / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:20]


def endpoint() -> str | None:
    return os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")


def _s3():
    """One boto3 S3 client per process (clients are thread-safe; it is built once, under a lock)."""
    global _client
    with _client_lock:
        if _client is None:
            import boto3
            from botocore.config import Config
            _client = boto3.session.Session().client(
                "s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None,
                config=Config(retries={"mode": "standard"}, connect_timeout=10, read_timeout=60))
        return _client


def explain(url: str, err: Exception) -> StorageError:
    """A client's exception as one line naming the URL, what went wrong and the fix."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, NoCredentialsError
    where = endpoint() or "AWS's default endpoint"
    bucket = bucket_and_key(url)[0]
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or (status == 404 and not bucket_and_key(url)[1]):
            return StorageError(f"{url}: the bucket '{bucket}' does not exist at {where}. Fix: create it (e.g. `aws s3 "
                                f"mb s3://{bucket}`), or correct the URL or S3_ENDPOINT_URL")
        if code in ("NoSuchKey", "404"):
            return Missing(f"{url} does not exist. Fix: check the URL (a prefix must hold what calm-train wrote)")
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{url}: the request was denied ({code}: {err.response['Error'].get('Message', '')}). "
                                f"Fix: use credentials that may read, write, list and delete in '{bucket}' ({CREDENTIALS})")
        return StorageError(f"{url}: {code or status}: {err}. Fix: check the URL, the bucket and S3_ENDPOINT_URL")
    if isinstance(err, NoCredentialsError):
        return StorageError(f"{url}: no credentials for {where}. Fix: {CREDENTIALS}")
    if isinstance(err, (ConnectionError, HTTPClientError)):
        return StorageError(f"{url}: cannot reach {where} ({err}). Fix: check S3_ENDPOINT_URL / AWS_ENDPOINT_URL and "
                            "the network")
    return StorageError(f"{url}: {type(err).__name__}: {err}. Fix: check the URL, the credentials and the endpoint")


@contextlib.contextmanager
def _errors(url: str):
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError
    try:
        yield
    except (ClientError, BotoCoreError) as err:
        raise explain(url, err) from err
    except Boto3Error as err:           # the transfer manager's wrapper of the client's error
        cause = getattr(err, "last_exception", None) or err.__context__
        raise explain(url, cause if isinstance(cause, (ClientError, BotoCoreError)) else err) from err


def _s3_only(url: str, what: str) -> tuple[str, str]:
    require_client(url, what, write=True)
    return bucket_and_key(url)


def download(url: str, path: pathlib.Path) -> None:
    """The object at `url` into `path` (written beside it, then renamed: never half a file)."""
    require_client(url, "reading")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.download-{os.getpid()}-{threading.get_ident()}")
    try:
        if scheme(url) == "s3":
            with _errors(url):
                _s3().download_file(*bucket_and_key(url), str(tmp))
        else:
            from streaming.base.storage import CloudDownloader
            try:
                CloudDownloader.direct_download(url, str(tmp))
            except Exception as err:        # noqa: BLE001 - each client raises its own types; one line names them
                raise StorageError(f"{url}: could not be read ({type(err).__name__}: {err}). Fix: check the URL and "
                                   "the client's credentials") from err
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def get_bytes(url: str) -> bytes:
    if scheme(url) == "s3":
        require_client(url, "reading")
        with _errors(url):
            return _s3().get_object(Bucket=bucket_and_key(url)[0], Key=bucket_and_key(url)[1])["Body"].read()
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        download(url, pathlib.Path(tmp) / "object")
        return (pathlib.Path(tmp) / "object").read_bytes()


def exists(url: str) -> bool:
    bucket, key = _s3_only(url, "reading")
    try:
        with _errors(url):
            _s3().head_object(Bucket=bucket, Key=key)
        return True
    except Missing:
        return False


def listing(prefix_url: str) -> dict[str, int]:
    """{path relative to the prefix: bytes} of every object under `prefix_url`/."""
    bucket, key = _s3_only(prefix_url, "listing")
    prefix = f"{key}/" if key else ""
    found = {}
    with _errors(prefix_url):
        for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found.update({obj["Key"][len(prefix):]: obj["Size"] for obj in page.get("Contents", [])})
    return found


def upload(path: pathlib.Path, url: str) -> None:
    bucket, key = _s3_only(url, "writing")
    with _errors(url):
        _s3().upload_file(str(path), bucket, key)


def put_bytes(url: str, data: bytes) -> None:
    bucket, key = _s3_only(url, "writing")
    with _errors(url):
        _s3().put_object(Bucket=bucket, Key=key, Body=data)


def delete(prefix_url: str, names: list[str]) -> None:
    """Delete `prefix_url`/NAME for each name, in the order given (1000 per request)."""
    bucket, key = _s3_only(prefix_url, "deleting")
    for start in range(0, len(names), 1000):
        objects = [{"Key": f"{key}/{n}" if key else n} for n in names[start:start + 1000]]
        with _errors(prefix_url):
            result = _s3().delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
        if result.get("Errors"):
            first = result["Errors"][0]
            raise StorageError(f"{child(prefix_url, first['Key'][len(key):])}: could not be deleted ({first['Code']}: "
                               f"{first['Message']}). Fix: use credentials that may delete in '{bucket}'")


def check_writable(url: str) -> None:
    """Before any work: the bucket exists, and these credentials may list, write and delete under `url`."""
    probe = child(url, ".calm-train-write-check")
    listing(url)
    put_bytes(probe, b"")
    delete(url, [".calm-train-write-check"])
