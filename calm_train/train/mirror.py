"""CheckpointMirror: complete local checkpoints uploaded to `train.remote_checkpoints` in the background.

Rank 0 submits each checkpoint once it is complete (the checkpoint manager hard-links its files into
`checkpoints/.mirror-step_NNNNNNNN/` first, so a local pruning meanwhile takes nothing from the upload).  One
thread uploads them in order: every file, then the run's history (metrics.jsonl, eval.jsonl as they were),
then manifest.json, so a checkpoint whose manifest is in the bucket is complete there (convert/remote.py),
and applies the keep policy to the bucket (manifest deleted first).  Uploads never block a step.  A request
that fails is retried (botocore's own retries, then `attempts` times with a doubling pause); one that keeps
failing is reported in one line, the local checkpoint stays valid and the run goes on.  `close` waits for
every submitted upload and says where the newest checkpoint is.
"""
from __future__ import annotations

import pathlib
import queue
import shutil
import threading
import time

from calm_train.convert.native import MANIFEST, kept_steps, step_name
from calm_train.storage import objects
from calm_train.convert.remote import checkpoints_url, complete_steps, remote_steps
from calm_train.storage.url import StorageError, child


class CheckpointMirror:
    def __init__(self, url: str, keep_last: int, keep_every: int, log, attempts: int = 3, backoff_s: float = 2.0):
        self.url, self.keep_last, self.keep_every, self.log = url, keep_last, keep_every, log
        self.attempts, self.backoff_s = attempts, backoff_s
        self.newest: str | None = None          # URL of the newest checkpoint mirrored by this launch
        self.failed: str | None = None          # URL of the newest checkpoint whose upload failed (after newest)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, staged: pathlib.Path, step: int, history: dict[str, bytes]) -> None:
        """Upload `staged` (a complete checkpoint's files; removed once uploaded) as step `step`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="checkpoint-mirror", daemon=True)
            self._thread.start()
        self._queue.put((staged, step, history))

    def close(self) -> str | None:
        """Wait for every submitted upload; a line saying where the newest checkpoint is (None: nothing submitted)."""
        if self._thread is None:
            return None
        self._queue.put(None)
        self._thread.join()
        self._thread = None
        if self.failed:
            return (f"warning: the newest checkpoint is only local: mirroring it to {self.failed} failed (see above)"
                    f"{f'; the newest one in the bucket is {self.newest}' if self.newest else ''}")
        return f"checkpoints mirrored: the newest is {self.newest}" if self.newest else None

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            staged, step, history = item
            url = child(checkpoints_url(self.url), step_name(step))
            try:
                self._upload(staged, url, history)
                self._prune(step)
                self.newest, self.failed = url, None
                self.log(f"mirrored {step_name(step)} to {url}")
            except StorageError as err:
                self.failed = url
                self.log(f"warning: could not mirror {step_name(step)} to {url} after {self.attempts} attempts: {err} "
                         "The local checkpoint is intact and the run goes on; the next checkpoint is mirrored anew")
            except Exception as err:    # noqa: BLE001 - a bug here must not stop training: say it and go on
                self.failed = url
                self.log(f"warning: internal error while mirroring {step_name(step)} to {url} (a bug: "
                         f"{type(err).__name__}: {err}); the local checkpoint is intact and the run goes on")
            finally:
                shutil.rmtree(staged, ignore_errors=True)

    def _retry(self, request, *args) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                return request(*args)
            except StorageError as err:
                if attempt == self.attempts:
                    raise
                pause = self.backoff_s * 2 ** (attempt - 1)
                self.log(f"upload attempt {attempt} of {self.attempts} failed ({str(err).split(' Fix: ')[0]}); "
                         f"retrying in {pause:g} s")
                time.sleep(pause)

    def _upload(self, staged: pathlib.Path, url: str, history: dict[str, bytes]) -> None:
        files = sorted(p for p in staged.rglob("*") if p.is_file() and p.relative_to(staged).as_posix() != MANIFEST)
        for path in files:
            self._retry(objects.upload, path, child(url, *path.relative_to(staged).parts))
        for name, data in history.items():
            self._retry(objects.put_bytes, child(self.url, name), data)
        self._retry(objects.upload, staged / MANIFEST, child(url, MANIFEST))

    def _prune(self, newest: int) -> None:
        steps = complete_steps(self.url)
        keep = kept_steps(steps, self.keep_last, self.keep_every)
        files = remote_steps(self.url)
        for step in steps:
            if step not in keep and step < newest:
                names = [MANIFEST, *sorted(set(files[step]) - {MANIFEST})]     # no longer complete, first
                self._retry(objects.delete, child(checkpoints_url(self.url), step_name(step)), names)
