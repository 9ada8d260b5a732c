"""Atomic checkpoints in RUN_DIR/checkpoints (the format itself: convert/native.py).

A save writes everything into `checkpoints/.partial-step_NNNNNNNN/`, fsyncs it, writes a manifest
(every file with its size and sha256) last, renames the directory to `step_NNNNNNNN` and only then
replaces `checkpoints/latest` (write + fsync + rename).  A directory without a manifest, or whose
files disagree with it, is incomplete: it is reported and skipped, never loaded and never deleted.
A save that the file system refuses (full, read-only, quota) stops the run with one line saying
that the previous checkpoint and `latest` are intact; the ranks agree on it, so none waits forever.
Pruning renames an old checkpoint to `.pruning-step_NNNNNNNN` before deleting it: a kill in between
leaves a directory that is recognised as half-pruned and removed at the next start.

With `train.async_save` the same directory is written by a background thread from host copies of the
tensors (the next save and the exit wait for it); with `train.remote_checkpoints` every complete
checkpoint is mirrored to a bucket in the background (train/mirror.py), and a start without local
checkpoints resumes from the bucket's newest complete one (convert/remote.py).

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
import threading

import numpy as np
import torch

from calm_train.convert.native import (LATEST, PARTIAL_PREFIX, PRUNING_PREFIX, CheckpointError, complete_checkpoints,
                                       kept_steps, open_safetensors, step_dirs, step_name, step_of, verify_checkpoint,
                                       write_manifest)
from calm_train.files import fsync_dir, write_atomic

from calm_train.convert.remote import HISTORY

MIRROR_PREFIX = ".mirror-"              # checkpoints/.mirror-step_NNNNNNNN: hard links of a checkpoint being uploaded

# ---------------------------------------------------------------------------------------------
# RNG states


def rng_file(directory: pathlib.Path, rank: int) -> pathlib.Path:
    return pathlib.Path(directory) / "rng" / f"rank_{rank:05d}.safetensors"


def rng_snapshot() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's python, numpy, torch (and CUDA) RNG states now: tensors and JSON metadata."""
    version, python_state, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {"python": torch.tensor(python_state, dtype=torch.int64),
               "numpy": torch.from_numpy(keys.astype(np.int64)), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda/{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    scalars = {"python": [version, gauss_next], "numpy": [kind, int(pos), int(has_gauss), float(cached_gaussian)]}
    return tensors, {"scalars": json.dumps(scalars)}


def write_rng_state(path: pathlib.Path, snapshot: tuple[dict[str, torch.Tensor], dict[str, str]]) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(exist_ok=True)
    save_file(snapshot[0], str(path), snapshot[1])


def save_rng_state(path: pathlib.Path) -> None:
    write_rng_state(path, rng_snapshot())


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


class _Group:
    """barrier and agree(ok) over a gloo group of its own: the background writer's collectives never mix with
    the training thread's (one group's collectives stay in one thread); no-ops in one process."""

    def __init__(self):
        import torch.distributed as dist
        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.group = self.dist.new_group(backend="gloo") if self.dist else None

    def barrier(self) -> None:
        if self.dist:
            self.dist.barrier(group=self.group)

    def agree(self, ok: bool) -> bool:
        if not self.dist:
            return ok
        flag = torch.tensor([1 if ok else 0])
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())


class CheckpointManager:
    """Saves, finds and prunes the checkpoints of one run directory, and mirrors them to a bucket.

    `save` is collective: every rank calls it with the same step; `barrier` synchronises the ranks and
    `agree(ok)` tells whether every rank passed `ok` (both no-ops in one process). Only rank 0 writes
    the manifest, renames and updates `latest`.  `guard()` is called at the start of a save and right before
    the rename and the `latest` update (it raises when the run has lost its run directory).

    `async_save`: `save` returns at once and a background thread writes the same checkpoint (from host copies
    of the tensors that the caller took: the engine's exports and rng_snapshot are copies); its ranks agree over a group of their own before rank 0
    publishes.  The next `save` and `close` wait for it, and a failure is raised there, the same error a
    synchronous save raises.  `remote` (train.remote_checkpoints): rank 0 mirrors every complete checkpoint
    there in the background (train/mirror.py) and `sync_remote` restores from it at a start.
    """

    def __init__(self, run_dir, rank: int = 0, barrier=lambda: None, keep_last: int = 2, keep_every: int = 0,
                 log=print, agree=lambda ok: ok, guard=lambda: None, async_save: bool = False,
                 remote: str | None = None):
        self.root = pathlib.Path(run_dir) / "checkpoints"
        self.rank, self.barrier, self.agree, self.log, self.guard = rank, barrier, agree, log, guard
        self.keep_last, self.keep_every = keep_last, keep_every
        self.background = _Group() if async_save else None
        self._writer: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.remote = remote
        self.mirror = None
        if remote and rank == 0:
            from calm_train.train.mirror import CheckpointMirror
            self.mirror = CheckpointMirror(remote, keep_last, keep_every, log)

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
        """`write_files(directory)` is called on every rank to write its files into the partial directory
        (in the background writer with async_save: it must read only what cannot change meanwhile)."""
        self.guard()
        self.wait()
        if self.background is None:
            return self._save(step, write_files, manifest_extra, self.barrier, self.agree)

        def write() -> None:
            try:
                self._save(step, write_files, manifest_extra, self.background.barrier, self.background.agree)
            except BaseException as err:     # noqa: BLE001 - raised by wait(), on the training thread
                self._failure = err
        self._writer = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        self._writer.start()
        return self.root / step_name(step)

    def wait(self) -> None:
        """Until the background save (if any) is done; raises its error."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def close(self, raise_errors: bool = True) -> None:
        """At the run's exit: wait for the background save and the uploads, and say where the checkpoints are."""
        try:
            self.wait()
        except Exception as err:        # noqa: BLE001 - on an exit that already fails, the first error is the story
            if raise_errors:
                raise
            self.log(f"the background save failed too: {err}")
        finally:
            if self.mirror is not None:
                message = self.mirror.close()
                if message:
                    self.log(message)

    def _save(self, step: int, write_files, manifest_extra: dict, barrier, agree) -> pathlib.Path:
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
            self.guard()
            os.replace(partial, final)
            fsync_dir(self.root)
            self.guard()
            write_atomic(self.root / LATEST, final.name + "\n")

        self._collectively(prepare if self.rank == 0 else None, step, partial, agree)
        self._collectively(lambda: write_files(partial), step, partial, agree)
        self._collectively(finish if self.rank == 0 else None, step, partial, agree)
        if self.rank == 0:
            self._prune(step)
            self.log(f"saved {final}")
            if self.mirror is not None:
                self._submit(final)
        barrier()
        return final

    def _collectively(self, part, step: int, partial: pathlib.Path, agree) -> None:
        """Run this rank's `part` of a save; when it fails on any rank, every rank raises (the file system's
        refusal as one line; any other error as it is on its own rank)."""
        from safetensors import SafetensorError
        error = None
        try:
            if part is not None:
                part()
        except Exception as err:           # noqa: BLE001 - agreed on first, so that no rank waits forever
            error = err
        if agree(error is None):
            return
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        refused = isinstance(error, OSError) or isinstance(error, SafetensorError) and "I/O error" in str(error)
        if error is not None and not refused:
            raise error
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
        keep = kept_steps([step_of(p) for p in complete], self.keep_last, self.keep_every)
        for path in complete:
            if step_of(path) not in keep and step_of(path) < newest:
                doomed = path.with_name(PRUNING_PREFIX + path.name)
                os.replace(path, doomed)        # no longer a checkpoint, whatever the removal leaves behind
                shutil.rmtree(doomed)

    def finish_pruning(self) -> None:
        """Remove what an interrupted pruning (or upload) left (rank 0, at the start of a launch)."""
        for path in sorted(self.root.glob(PRUNING_PREFIX + "*")) if self.root.is_dir() else []:
            shutil.rmtree(path)
            self.log(f"removed {path}: an old checkpoint whose pruning was interrupted")
        for path in sorted(self.root.glob(MIRROR_PREFIX + "*")) if self.root.is_dir() else []:
            shutil.rmtree(path)             # hard links of a checkpoint whose upload was cut: sync_remote redoes it

    # ------------------------------------------------------------------------------------------
    # the bucket (train.remote_checkpoints), rank 0

    def _submit(self, ckpt: pathlib.Path) -> None:
        """Hand a complete checkpoint to the mirror: its files hard-linked aside (a pruning meanwhile removes
        only names), and the run's history as it is now (whole lines)."""
        staged = self.root / f"{MIRROR_PREFIX}{ckpt.name}"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(ckpt, staged, copy_function=_link_or_copy)
        history = {}
        for name in HISTORY:
            path = self.root.parent / name
            if path.is_file():
                data = path.read_bytes()
                history[name] = data[:data.rfind(b"\n") + 1]
        self.mirror.submit(staged, step_of(ckpt), history)

    def sync_remote(self, resume_from: str) -> None:
        """At the start of a launch (rank 0, under the run directory's lock, before anything is trained): one line
        if the bucket cannot be used; with the automatic resume, the bucket's newest complete checkpoint is
        downloaded (every sha256 checked) when the run directory has none as new, and the newest local one is
        uploaded when the bucket lacks it."""
        from calm_train.storage import objects
        from calm_train.convert.remote import complete_steps, restore_history, restore_newest
        if not self.remote:
            return
        objects.check_writable(self.remote)
        if resume_from:
            return
        local = self.latest()
        remote = complete_steps(self.remote)
        if remote and (local is None or remote[-1] > step_of(local)):
            self.root.mkdir(parents=True, exist_ok=True)
            restored = restore_newest(self.remote, self.root, self.log)
            if restored is not None and (local is None or step_of(restored) > step_of(local)):
                write_atomic(self.root / LATEST, restored.name + "\n")
                restore_history(self.remote, self.root.parent)
                return
        if local is not None and step_of(local) not in remote:
            self._submit(local)

    def check_remote_branch(self, start: pathlib.Path | None, resume_from: str) -> None:
        """train.resume_from=scratch or PATH starts a new branch of the run: refuse it while the bucket holds
        later checkpoints, which a start without local checkpoints would take."""
        from calm_train.convert.remote import complete_steps
        if not self.remote or not resume_from:
            return
        step = step_of(start) if start is not None else 0
        later = [s for s in complete_steps(self.remote) if s > step]
        newest = self.latest()
        if later and (start is None or newest is None or start.resolve() != newest.resolve()):
            raise CheckpointError(
                f"train.resume_from={resume_from} restarts the run at step {step}, but {self.remote} holds its later "
                f"checkpoint(s) {step_name(later[-1])}, which a start without local checkpoints would resume from. "
                "Fix: use a new train.remote_checkpoints URL for the restarted run (or delete those checkpoints there)")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
