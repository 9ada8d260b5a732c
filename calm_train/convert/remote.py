"""Checkpoints at a URL: a run directory's checkpoints/ and history, in a bucket (written by mirror.py).

    URL/checkpoints/step_NNNNNNNN/...   the files of a checkpoint (convert/native.py), manifest.json uploaded last
    URL/metrics.jsonl, URL/eval.jsonl   the run's history as it was when the newest checkpoint was mirrored

A step without manifest.json is an upload in progress, or one that a kill cut: it is never taken.  A
checkpoint is downloaded manifest first, then every file it lists, into a directory beside its destination
that is renamed into place only once every file matches its sha256.  `fetch_checkpoint` is the one resolver
of a CHECKPOINT argument (eval, generate, convert, model.init_from, model.autoencoder, train.resume_from):
a local path is returned as it is; a URL (a run's prefix: its newest complete checkpoint, or one checkpoint's
prefix) is downloaded into the local cache, verified, and that directory is returned.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil

from calm_train.convert.native import MANIFEST, STEP_DIR, CheckpointError, step_name, verify_checkpoint
from calm_train.storage import objects
from calm_train.storage.url import Missing, child, is_url, require_client

HISTORY = ("metrics.jsonl", "eval.jsonl")


def checkpoints_url(run_url: str) -> str:
    return child(run_url, "checkpoints")


def remote_steps(run_url: str) -> dict[int, dict[str, int]]:
    """{step: {file relative to the checkpoint: bytes}} of every step prefix under URL/checkpoints/."""
    steps: dict[int, dict[str, int]] = {}
    for rel, size in objects.listing(checkpoints_url(run_url)).items():
        top, _, rest = rel.partition("/")
        match = STEP_DIR.match(top)
        if match and rest:
            steps.setdefault(int(match.group(1)), {})[rest] = size
    return steps


def complete_steps(run_url: str) -> list[int]:
    """Steps whose manifest.json is in the bucket, oldest first."""
    return sorted(step for step, files in remote_steps(run_url).items() if MANIFEST in files)


def download_checkpoint(ckpt_url: str, dest: pathlib.Path) -> pathlib.Path:
    """The checkpoint at `ckpt_url` as the local directory `dest`, every file checked against its sha256.
    A `dest` that already holds this very checkpoint (same manifest, files intact) is kept."""
    manifest = objects.get_bytes(child(ckpt_url, MANIFEST))
    if (dest / MANIFEST).is_file() and (dest / MANIFEST).read_bytes() == manifest:
        try:
            verify_checkpoint(dest, hashes=True)
            return dest
        except CheckpointError:
            shutil.rmtree(dest)
    staging = dest.with_name(f".download-{dest.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        files = json.loads(manifest)["files"]
        for rel in files:
            objects.download(child(ckpt_url, rel), staging / rel)
        (staging / MANIFEST).write_bytes(manifest)
        verify_checkpoint(staging, hashes=True)
    except CheckpointError as err:
        raise CheckpointError(f"{ckpt_url} (downloaded to {staging}): {err}") from err
    except (ValueError, KeyError, Missing) as err:
        raise CheckpointError(f"{ckpt_url}: its {MANIFEST} names files the bucket does not hold or is not a "
                              f"manifest ({err}). Fix: use another checkpoint of the run") from err
    finally:
        if not (staging / MANIFEST).is_file():
            shutil.rmtree(staging, ignore_errors=True)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, dest)
    return dest


def newest_url(run_url: str) -> str:
    """The newest complete checkpoint under a run's URL, or the URL itself when it is one checkpoint's prefix."""
    if objects.exists(child(run_url, MANIFEST)):
        return run_url
    steps = complete_steps(run_url)
    if not steps:
        raise CheckpointError(f"{run_url} holds no complete checkpoint ({checkpoints_url(run_url)}/step_*/{MANIFEST}). "
                              "Fix: pass the train.remote_checkpoints URL of a run that has mirrored one, or "
                              "URL/checkpoints/step_NNNNNNNN")
    return child(checkpoints_url(run_url), step_name(steps[-1]))


def fetch_checkpoint(spec):
    """A CHECKPOINT argument as a local path: a local one as it is, a URL downloaded into the cache and verified."""
    if not is_url(spec):
        return spec
    require_client(spec, "checkpoint", write=True)
    url = newest_url(spec)
    return download_checkpoint(url, objects.cache_dir("checkpoints", url) / url.rstrip("/").rsplit("/", 1)[-1])


def restore_newest(run_url: str, root: pathlib.Path, log) -> pathlib.Path | None:
    """On a start without local checkpoints: the newest complete remote checkpoint that downloads intact, as
    ROOT/step_NNNNNNNN (damaged newer ones are named and passed over); None when the bucket holds none."""
    for step in reversed(complete_steps(run_url)):
        url = child(checkpoints_url(run_url), step_name(step))
        try:
            path = download_checkpoint(url, root / step_name(step))
        except CheckpointError as err:
            log(f"skipping remote checkpoint: {err}")
            continue
        log(f"downloaded {url} to {path} (every file matches its sha256)")
        return path
    return None


def restore_history(run_url: str, run_dir: pathlib.Path) -> None:
    """URL/metrics.jsonl and URL/eval.jsonl into a run directory that has none (the resume drops later lines)."""
    for name in HISTORY:
        if not (run_dir / name).exists():
            try:
                objects.download(child(run_url, name), run_dir / name)
            except Missing:
                pass
