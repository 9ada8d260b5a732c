"""Atomic checkpoints in RUN_DIR/checkpoints (the format itself: convert/native.py).

A save writes everything into `checkpoints/.partial-step_NNNNNNNN/`, fsyncs it, writes a manifest
(every file with its size and sha256) last, renames the directory to `step_NNNNNNNN` and only then
replaces `checkpoints/latest` (write + fsync + rename).  A directory without a manifest, or whose
files disagree with it, is incomplete: it is reported and skipped, never loaded and never deleted.
A save that the file system refuses (full, read-only, quota) stops the run with one line saying
that the previous checkpoint and `latest` are intact; the ranks agree on it, so none waits forever.
Pruning renames an old checkpoint to `.pruning-step_NNNNNNNN` before deleting it: a kill in between
leaves a directory that is recognised as half-pruned and removed at the next start.

Besides the files of convert/native.py, the training loop writes into each checkpoint
`rng/rank_NNNNN.safetensors`: the python, numpy, torch (and CUDA) RNG states of every rank as tensors,
with the scalars in JSON metadata.
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import random
import shutil

import numpy as np
import torch

from calm_train.convert.native import (LATEST, PARTIAL_PREFIX, PRUNING_PREFIX, CheckpointError, complete_checkpoints,
                                       open_safetensors, step_dirs, step_name, step_of, verify_checkpoint,
                                       write_manifest)
from calm_train.files import fsync_dir, write_atomic

# ---------------------------------------------------------------------------------------------
# RNG states


def rng_file(directory: pathlib.Path, rank: int) -> pathlib.Path:
    return pathlib.Path(directory) / "rng" / f"rank_{rank:05d}.safetensors"


def save_rng_state(path: pathlib.Path) -> None:
    from safetensors.torch import save_file
    version, python_state, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {"python": torch.tensor(python_state, dtype=torch.int64),
               "numpy": torch.from_numpy(keys.astype(np.int64)), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda/{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    scalars = {"python": [version, gauss_next], "numpy": [kind, int(pos), int(has_gauss), float(cached_gaussian)]}
    path.parent.mkdir(exist_ok=True)
    save_file(tensors, str(path), {"scalars": json.dumps(scalars)})


def load_rng_state(path: pathlib.Path) -> dict:
    """The states save_rng_state wrote (read, not yet applied: set_rng_state)."""
    with open_safetensors(path) as f:
        try:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            scalars = json.loads((f.metadata() or {})["scalars"])
            version, gauss_next = scalars["python"]
            kind, pos, has_gauss, cached_gaussian = scalars["numpy"]
            return {"python": (version, tuple(int(x) for x in tensors["python"].tolist()), gauss_next),
                    "numpy": (kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached_gaussian),
                    "torch": tensors["torch"],
                    "cuda": [tensors[f"cuda/{i}"] for i in range(sum(k.startswith("cuda/") for k in tensors))]}
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{path} does not hold RNG states ({type(err).__name__}: {err}). Fix: restore the "
                                  "file from a copy, or use another checkpoint") from err


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# the manager


class CheckpointWriteError(CheckpointError):
    """The file system refused a save; the previous checkpoint is intact."""


class CheckpointManager:
    """Saves, finds and prunes the checkpoints of one run directory.

    `save` is collective: every rank calls it with the same step; `barrier` synchronises the ranks and
    `agree(ok)` tells whether every rank passed `ok` (both no-ops in one process). Only rank 0 writes
    the manifest, renames and updates `latest`.
    """

    def __init__(self, run_dir, rank: int = 0, barrier=lambda: None, keep_last: int = 2, keep_every: int = 0,
                 log=print, agree=lambda ok: ok):
        self.root = pathlib.Path(run_dir) / "checkpoints"
        self.rank, self.barrier, self.agree, self.log = rank, barrier, agree, log
        self.keep_last, self.keep_every = keep_last, keep_every

    def complete(self) -> list[pathlib.Path]:
        """Complete checkpoints, oldest first; incomplete ones are reported and skipped (never deleted)."""
        return complete_checkpoints(self.root, self.log)

    def latest(self, hashes: bool = False) -> pathlib.Path | None:
        """The newest complete checkpoint. `latest` names it normally; the scan covers a crash between
        the rename and the `latest` update. With `hashes`, the sha256 of every file is checked too and a
        damaged checkpoint is reported and passed over for the next older one."""
        if hashes:
            return self.newest_intact()[0]
        complete = self.complete()
        return complete[-1] if complete else None

    def newest_intact(self) -> tuple[pathlib.Path | None, list[CheckpointError]]:
        """The newest checkpoint whose every file matches its size and sha256, and the errors of the damaged
        newer ones (each reported and passed over)."""
        damaged = []
        for path in reversed(step_dirs(self.root)):
            try:
                verify_checkpoint(path, hashes=True)
                return path, damaged
            except CheckpointError as err:
                self.log(f"skipping checkpoint: {err}")
                damaged.append(err)
        return None, damaged

    def save(self, step: int, write_files, manifest_extra: dict) -> pathlib.Path:
        """`write_files(directory)` is called on every rank to write its files into the partial directory."""
        final = self.root / step_name(step)
        partial = self.root / f"{PARTIAL_PREFIX}{step_name(step)}"

        def prepare() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)          # our own leftover of this very step: safe to redo
            partial.mkdir()

        def finish() -> None:
            write_manifest(partial, step, manifest_extra)
            if final.exists():                 # a checkpoint of this step from an earlier attempt
                shutil.rmtree(final)
            os.replace(partial, final)
            fsync_dir(self.root)
            write_atomic(self.root / LATEST, final.name + "\n")

        self._collectively(prepare if self.rank == 0 else None, step, partial)
        self._collectively(lambda: write_files(partial), step, partial)
        self._collectively(finish if self.rank == 0 else None, step, partial)
        if self.rank == 0:
            self._prune(step)
        self.barrier()
        return final

    def _collectively(self, part, step: int, partial: pathlib.Path) -> None:
        """Run this rank's `part` of a save; when the file system refuses it on any rank, every rank raises."""
        from safetensors import SafetensorError
        error = None
        try:
            if part is not None:
                part()
        except OSError as err:
            error = err
        except SafetensorError as err:           # safetensors reports the file system's refusal this way
            if "I/O error" not in str(err):
                raise
            error = err
        if self.agree(error is None):
            return
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        previous = self.latest()
        kept = (f"the previous checkpoint {previous} and {self.root / LATEST} are intact" if previous else
                "no earlier checkpoint exists (a relaunch starts at step 0)")
        if error is None:
            cause = "another rank could not write its part"
        elif isinstance(error, OSError):
            cause = (f"{error.strerror or error} [{errno.errorcode.get(error.errno, type(error).__name__)}]"
                     f"{' at ' + str(error.filename) if error.filename else ''}")
        else:
            cause = str(error)
        raise CheckpointWriteError(
            f"could not save {step_name(step)} in {self.root}: {cause}; {kept}, the partial save was removed. Fix: "
            "free space (or make the file system writable), then relaunch the same command to resume")

    def _prune(self, newest: int) -> None:
        complete = self.complete()
        keep = {p for p in complete[-self.keep_last:]}
        if self.keep_every:
            keep |= {p for p in complete if step_of(p) % self.keep_every == 0}
        for path in complete:
            if path not in keep and step_of(path) < newest:
                doomed = path.with_name(PRUNING_PREFIX + path.name)
                os.replace(path, doomed)        # no longer a checkpoint, whatever the removal leaves behind
                shutil.rmtree(doomed)

    def finish_pruning(self) -> None:
        """Remove what an interrupted pruning left (rank 0, at the start of a launch)."""
        for path in sorted(self.root.glob(PRUNING_PREFIX + "*")) if self.root.is_dir() else []:
            shutil.rmtree(path)
            self.log(f"removed {path}: an old checkpoint whose pruning was interrupted")
