"""Atomic, verifiable checkpoints in RUN_DIR/checkpoints.

A save writes everything into `checkpoints/.partial-step_NNNNNNNN/`, fsyncs it, writes a manifest
(every file with its size and sha256) last, renames the directory to `step_NNNNNNNN` and only then
replaces `checkpoints/latest` (write + fsync + rename).  A directory without a manifest, or whose
files disagree with it, is incomplete: it is reported and skipped, never loaded and never deleted.

Layout of one checkpoint:
    manifest.json      format, step, files {relative path: [bytes, sha256]}, written last
    state.json         client state: step, tokens, samples, loader state, skipped steps, config hash, AE hash
    config.yaml        the run's resolved config
    tokenizer/         the run's tokenizer, so eval/generate/convert need only the checkpoint
    model.safetensors  the full fp32 model (TP/PP-gathered, ZeRO-consolidated): eval, export, reshard
    optimizer.safetensors  Adam's moments under the same full names + the Adam step: reshard in another layout
    autoencoder.safetensors + autoencoder.yaml   (CALM) the frozen autoencoder it was trained against
    engine/            DeepSpeed's own files (model + optimizer shards of every rank): exact resume
    rng/rank_NNNNN.pt  python, numpy, torch (and CUDA) RNG states of every rank
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import sys

import numpy as np
import torch

from calm_train.errors import UserError
from calm_train.files import sha256_file

FORMAT = 1
MANIFEST = "manifest.json"
LATEST = "latest"
PARTIAL_PREFIX = ".partial-"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def fsync_tree(root: pathlib.Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_manifest(directory: pathlib.Path, step: int, extra: dict) -> None:
    """Record every file's size and sha256, fsync, then write manifest.json last: the mark of a complete checkpoint."""
    files = {str(p.relative_to(directory)): [p.stat().st_size, sha256_file(p)]
             for p in sorted(directory.rglob("*")) if p.is_file()}
    fsync_tree(directory)
    write_atomic(directory / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files, **extra},
                                                  indent=1))


# ---------------------------------------------------------------------------------------------
# verification


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded; the message names the file and the fix."""


def verify_checkpoint(ckpt: pathlib.Path, hashes: bool = True) -> dict:
    """The manifest of a complete checkpoint, or CheckpointError naming the missing or damaged file."""
    ckpt = pathlib.Path(ckpt)
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{ckpt} is incomplete: {MANIFEST} is missing (the save was interrupted). "
                              "Fix: resume from an earlier checkpoint (the run does this by itself) or delete it")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({err}). Fix: delete this checkpoint") from err
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} has format {manifest.get('format')}, this version reads {FORMAT}. "
                              "Fix: convert it with a matching calm-train version")
    for rel, (size, digest) in manifest["files"].items():
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from checkpoint {ckpt}. Fix: restore the file or use "
                                  "another checkpoint")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path} has {path.stat().st_size} bytes, the manifest says {size} (truncated "
                                  "or overwritten). Fix: restore the file or use another checkpoint")
        if hashes and sha256_file(path) != digest:
            raise CheckpointError(f"{path} does not match its sha256 in {manifest_path} (corrupted). Fix: restore "
                                  "the file or use another checkpoint")
    return manifest


def resolve_checkpoint(spec: str | os.PathLike) -> pathlib.Path:
    """A run directory (its latest complete checkpoint) or a checkpoint directory -> the checkpoint directory."""
    path = pathlib.Path(spec)
    if (path / MANIFEST).is_file():
        return path
    if (path / "checkpoints").is_dir():
        found = CheckpointManager(path, log=lambda message: print(message, file=sys.stderr)).latest()  # stdout: results
        if found is None:
            raise CheckpointError(f"{path}/checkpoints holds no complete checkpoint. Fix: train longer or point "
                                  "at a checkpoint directory")
        return found
    if path.is_dir() and (path.name.startswith(PARTIAL_PREFIX) or (path / "engine").is_dir()):
        verify_checkpoint(path)                 # raises, naming what is missing
    raise CheckpointError(f"{path} is neither a run directory nor a checkpoint (no {MANIFEST} or checkpoints/). "
                          "Fix: pass RUN_DIR, RUN_DIR/checkpoints/step_NNNNNNNN or an exported directory")


# ---------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# the manager


class CheckpointManager:
    """Saves, finds and prunes the checkpoints of one run directory.

    `save` is collective: every rank calls it with the same step; `barrier` synchronises the ranks
    (a no-op in one process). Only rank 0 writes the manifest, renames and updates `latest`.
    """

    def __init__(self, run_dir, rank: int = 0, barrier=lambda: None, keep_last: int = 2, keep_every: int = 0,
                 log=print):
        self.root = pathlib.Path(run_dir) / "checkpoints"
        self.rank, self.barrier, self.log = rank, barrier, log
        self.keep_last, self.keep_every = keep_last, keep_every

    def complete(self) -> list[pathlib.Path]:
        """Complete checkpoints, oldest first; incomplete ones are reported and skipped (never deleted)."""
        found = []
        for path in sorted(self.root.glob("step_*")):
            try:
                verify_checkpoint(path, hashes=False)
                found.append(path)
            except CheckpointError as err:
                self.log(f"skipping checkpoint: {err}")
        for path in sorted(self.root.glob(PARTIAL_PREFIX + "*")):
            self.log(f"skipping interrupted save {path} (no manifest); it is left in place for inspection")
        return found

    def latest(self, hashes: bool = False) -> pathlib.Path | None:
        """The newest complete checkpoint. `latest` names it normally; the scan covers a crash between
        the rename and the `latest` update. With `hashes`, the sha256 of every file is checked too and a
        damaged checkpoint is reported and passed over for the next older one."""
        for path in reversed(self.complete()):
            try:
                if hashes:
                    verify_checkpoint(path, hashes=True)
                return path
            except CheckpointError as err:
                self.log(f"skipping checkpoint: {err}")
        return None

    def save(self, step: int, write_files, manifest_extra: dict) -> pathlib.Path:
        """`write_files(directory)` is called on every rank to write its files into the partial directory."""
        final = self.root / step_name(step)
        partial = self.root / f"{PARTIAL_PREFIX}{step_name(step)}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)          # our own leftover of this very step: safe to redo
            partial.mkdir()
        self.barrier()
        write_files(partial)
        self.barrier()
        if self.rank == 0:
            write_manifest(partial, step, manifest_extra)
            if final.exists():                 # a checkpoint of this step from an earlier attempt
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(self.root)
            write_atomic(self.root / LATEST, final.name + "\n")
            self._prune(step)
        self.barrier()
        return final

    def _prune(self, newest: int) -> None:
        complete = self.complete()
        keep = {p for p in complete[-self.keep_last:]}
        if self.keep_every:
            keep |= {p for p in complete if int(p.name.split("_")[1]) % self.keep_every == 0}
        for path in complete:
            if path not in keep and int(path.name.split("_")[1]) < newest:
                shutil.rmtree(path)
