"""Per-job local shard cache and private TMPDIR for StreamingDataset, and stale shared-memory cleanup.

    ROOT/job-<key>-<host>/owner.json   pid of the local leader that owns the job
    ROOT/job-<key>-<host>/local/N/     streaming's `local` of dataset N: shards copied (and hash-checked) from its dir
    ROOT/job-<key>-<host>/tmp/         private TMPDIR: streaming's filelocks never collide with other jobs

ROOT is `cache_dir`, or `calm_train_data` under the system temp dir.  A job whose owner is dead leaves
its directory and, if it was killed, shared-memory segments `/dev/shm/NNNNNN_*`.  Before a new job
starts, its leader removes such jobs of this host and exactly those segments whose `NNNNNN_locals`
names the dead job's local dir (streaming's own cleanup removes the lowest prefixes blindly, live
ones included, and stops at the first gap).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import tempfile
from dataclasses import dataclass

SHM_DIR = pathlib.Path("/dev/shm")


@dataclass
class Job:
    root: pathlib.Path
    leader: bool

    @property
    def local(self) -> pathlib.Path:
        return self.root / "local"

    @property
    def tmp(self) -> pathlib.Path:
        return self.root / "tmp"

    def close(self) -> None:
        """Remove the directory; a live process's own segments go with its resource tracker at exit."""
        if self.leader:
            shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _segments_of(local: pathlib.Path) -> list[pathlib.Path]:
    """/dev/shm entries of every streaming prefix registered with `local` (or a directory in it) as a local dir."""
    found = []
    for locals_file in SHM_DIR.glob("*_locals") if SHM_DIR.is_dir() else ():
        try:
            data = locals_file.read_bytes()
        except OSError:
            continue
        size = int.from_bytes(data[:4], "little")
        names = data[4:size].decode("utf-8", "replace").split("\0")[:-1]
        if any(name == str(local) or name.startswith(f"{local}{os.sep}") for name in names):
            prefix = locals_file.name.split("_", 1)[0]
            found += SHM_DIR.glob(f"{prefix}_*")
    return found


def _remove_job(root: pathlib.Path) -> None:
    for segment in _segments_of(root / "local"):
        segment.unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)


def clean_stale_jobs(base: pathlib.Path) -> int:
    """Remove the directories and shared memory of this host's jobs under `base` whose owner died."""
    host = socket.gethostname()
    removed = 0
    for root in base.glob(f"job-*-{host}") if base.is_dir() else ():
        try:
            pid = json.loads((root / "owner.json").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            continue
        if not _alive(pid):
            _remove_job(root)
            removed += 1
    return removed


def open_job(cache_dir, key: str, leader: bool) -> Job:
    """This job's directories (created by the local leader after cleaning stale jobs)."""
    base = pathlib.Path(cache_dir) if cache_dir else pathlib.Path(tempfile.gettempdir()) / "calm_train_data"
    job = Job(base.resolve() / f"job-{key}-{socket.gethostname()}", leader)
    if leader:
        clean_stale_jobs(base)
        job.tmp.mkdir(parents=True, exist_ok=True)
        (job.root / "owner.json").write_text(json.dumps({"pid": os.getpid()}))
    return job
