"""Atomic checkpoints in RUN_DIR/checkpoints (the format itself: convert/native.py).

A save writes everything into `checkpoints/.partial-step_NNNNNNNN/`, fsyncs it, writes a manifest
(every file with its size and sha256) last, renames the directory to `step_NNNNNNNN` and only then
replaces `checkpoints/latest` (write + fsync + rename).  A directory without a manifest, or whose
files disagree with it, is incomplete: it is reported and skipped, never loaded and never deleted.

Besides the files of convert/native.py, the training loop writes into each checkpoint:
    engine/            DeepSpeed's own files (model + optimizer shards of every rank): exact resume
    rng/rank_NNNNN.pt  python, numpy, torch (and CUDA) RNG states of every rank
"""
from __future__ import annotations

import os
import pathlib
import random
import shutil

import numpy as np
import torch

from calm_train.convert.native import (LATEST, PARTIAL_PREFIX, CheckpointError, complete_checkpoints, step_name,
                                       verify_checkpoint, write_manifest)
from calm_train.files import fsync_dir, write_atomic

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
        return complete_checkpoints(self.root, self.log)

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
            fsync_dir(self.root)
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
