"""One run per run directory: RUN_DIR/.lock, taken by rank 0 before anything is written into RUN_DIR.

The record (JSON: host, pid, its start time and boot id, Slurm job id, start, token, heartbeat counter) is
written to a file of its own and hard-linked into place, an atomic create-if-absent on local and NFS v3+
file systems: a lock is complete or absent, and of several launches across nodes exactly one wins.  A
daemon thread (the heartbeat) checks every `timeout / 10` seconds that the lock is still ours (token and
inode) and increments the counter through the lock's own file descriptor.  A lock is stale when
  - its holder ran on this host and is dead: its pid is gone, a zombie, names a process that started at
    another time (a reused pid) or belongs to an earlier boot; a live one here, even suspended, never is,
  - it holds our own SLURM_JOB_ID (a requeued job: Slurm runs one instance of a job at a time),
  - its holder is on another host and its counter stays unchanged for `train.lock_timeout` seconds of the
    waiter's own monotonic clock (hosts' clocks and file mtimes may disagree),
  - or it is empty or unreadable (an older writer's full disk) and 5 s old or unchanged that long.
A stale lock is renamed aside (of several recoverers, exactly one rename succeeds), checked to be the
one judged stale, deleted, and taken anew.  A live lock stops the launch with RunDirBusy naming the
holder.  A holder whose lock was deleted or taken over stops before its next write (`check`, LockLost).
`release` removes the lock if it is still ours; it runs on every exit path.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket
import threading
import time
import uuid

from calm_train.errors import UserError
from calm_train.files import pid_alive

LOCK_NAME = ".lock"
UNREADABLE_S = 5.0      # an empty or unreadable lock this old (or unchanged this long) is stale


def _version(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _write_record(fd: int, record: dict) -> None:
    """The record at the start of file `fd`, on disk (a later record with a larger beat is never shorter)."""
    data, offset = (json.dumps(record) + "\n").encode(), 0
    while offset < len(data):
        offset += os.pwrite(fd, data[offset:], offset)
    os.fsync(fd)


class RunDirBusy(UserError):
    """Another live launch holds the run directory."""


class LockLost(UserError):
    """The lock this launch held was deleted or taken over: it must not write into the run directory again."""


def boot_id() -> str | None:
    """This boot of this host (Linux); a pid recorded in another boot names no process of this one."""
    try:
        return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_state(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of process `pid` from /proc/PID/stat (fields 3 and 22);
    None when it does not exist."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()      # after "pid (comm)", which may hold spaces and parentheses
    return fields[0], int(fields[19])


def describe_holder(holder: dict) -> str:
    job = holder.get("job_id")
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
            f"{f', Slurm job {job}' if job else ''}, started {holder.get('started', '?')}")


class RunLock:
    def __init__(self, run_dir, timeout_s: float, log=print):
        self.path = pathlib.Path(run_dir) / LOCK_NAME
        self.timeout_s, self.log = timeout_s, log
        self.token = uuid.uuid4().hex
        self.held = False
        self.lost: str | None = None             # why the lock is no longer ours (the heartbeat found out)
        self._ino: int | None = None             # the inode of the lock file we created
        self._fd: int | None = None              # open on it: the heartbeat rewrites the record through it
        self._held_record: dict = {}
        self.beat_s = max(0.05, min(60.0, timeout_s / 10))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        me = process_state(os.getpid())
        return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID"),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "token": self.token, "boot_id": boot_id(), "pid_start": me[1] if me else None,
                "beat_s": self.beat_s, "beat": 0}

    def _create(self) -> bool:
        """Write the record to a file of its own, then link it into place: the lock is complete or absent (a
        full disk fails the write, not the lock), and of several launches exactly one link succeeds."""
        staged = self.path.with_name(f"{LOCK_NAME}.new-{self.token}")
        record = self._record()
        fd = os.open(staged, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        try:
            _write_record(fd, record)
            os.link(staged, self.path)
        except BaseException as err:
            os.close(fd)
            if isinstance(err, FileExistsError):
                return False
            raise
        finally:
            staged.unlink(missing_ok=True)
        self._fd, self._held_record = fd, record
        return True

    def stale_reason(self, holder: dict, st: os.stat_result) -> tuple[str | None, str]:
        """(why the lock of `holder`, its file `st`, may be taken over, None: it is live; what shows it is live)."""
        here = holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
        if here:
            dead = self.dead_on_this_host(holder)
            if dead:
                return dead, ""
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("job_id") == job:
            return f"it holds our own Slurm job id {job} (a requeued job)", ""
        if here:                                 # alive here (perhaps suspended): never stale by its heartbeat
            return None, "its process is alive on this host"
        return self._watch_heartbeat(holder, st)

    def _watch_heartbeat(self, holder: dict, st: os.stat_result) -> tuple[str | None, str]:
        """A holder on another host: live while its heartbeat counter (or its file) changes, timed by our own
        monotonic clock (the hosts' clocks and the file's mtime may disagree); stale when it stays unchanged
        for train.lock_timeout, or three of the holder's own beats if that is longer."""
        beat_s = holder.get("beat_s")
        watch = max(self.timeout_s, 3 * beat_s if isinstance(beat_s, (int, float)) else 0.0)
        self.log(f"{self.path} is held by {describe_holder(holder)} on another host: watching its heartbeat for up "
                 f"to {watch:g}s (train.lock_timeout={self.timeout_s:g}) before taking it over")
        started, seen = time.monotonic(), (holder.get("beat"), _version(st))
        while time.monotonic() - started < watch:
            time.sleep(min(1.0, watch / 20))
            found = self._read()
            if found is None or (found[0].get("beat"), _version(found[1])) != seen:
                return None, f"its heartbeat advanced within {time.monotonic() - started:.1f}s"
        return (f"its heartbeat (beat {holder.get('beat', '?')}) did not advance in {watch:g}s "
                f"(train.lock_timeout={self.timeout_s:g})"), ""

    @staticmethod
    def dead_on_this_host(holder: dict) -> str | None:
        """Why the holder, a process of this host, is dead: gone, a zombie, its pid reused by a process that started
        at another time, or a pid of an earlier boot; None: it is alive."""
        pid, ours = holder["pid"], boot_id()
        if holder.get("boot_id") and ours and holder["boot_id"] != ours:
            return f"this host was rebooted since its process {pid} took it (boot id {holder['boot_id']})"
        if not os.path.isdir("/proc/self"):     # no /proc: existence is all we can know
            return None if pid_alive(pid) else f"its process {pid} on this host is gone"
        state = process_state(pid)
        if state is None:
            return f"its process {pid} on this host is gone"
        if state[0] in ("Z", "X"):
            return f"its process {pid} on this host is dead (a zombie not yet reaped by its parent)"
        if isinstance(holder.get("pid_start"), int) and state[1] != holder["pid_start"]:
            return (f"pid {pid} now belongs to another process (started at tick {state[1]} after boot, the holder "
                    f"at {holder['pid_start']})")
        return None

    def _read(self) -> tuple[dict, os.stat_result] | None:
        try:
            st = os.stat(self.path)
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            holder = {}                          # unreadable: see _unreadable_reason
        return (holder if isinstance(holder, dict) else {}), st

    def _unreadable_reason(self, st: os.stat_result) -> str | None:
        """An empty or unreadable lock (a crash or a full disk of an older writer; ours are linked whole) is stale
        once its file is UNREADABLE_S old, or stays so and unchanged that long; None: look at it again."""
        age = time.time() - st.st_mtime
        deadline = time.monotonic() + (0 if age > UNREADABLE_S else UNREADABLE_S)
        while time.monotonic() < deadline:
            time.sleep(0.1)
            found = self._read()
            if found is None or found[0] or _version(found[1]) != _version(st):
                return None
        when = f"was written {age:.0f}s ago" if age > UNREADABLE_S else f"stayed so for {UNREADABLE_S:g}s"
        return f"it is empty or unreadable ({st.st_size} bytes) and {when}"

    def acquire(self) -> None:
        """Take the lock, recovering a stale one; RunDirBusy when a live launch holds it."""
        for _ in range(5):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                created = self._create()
            except OSError as err:
                raise UserError(f"cannot create the lock {self.path}: {err.strerror or err}. Fix: free space on "
                                "run_dir's file system or make it writable, or choose another run_dir") from err
            if created:
                self.held, self.lost = True, None
                self._ino = os.stat(self.path).st_ino
                self._start_heartbeat()
                return
            found = self._read()
            if found is None:
                continue                         # released meanwhile: try again
            holder, st = found
            if not holder:
                reason = self._unreadable_reason(st)
                if reason is None:
                    continue                     # it changed: look again
            else:
                reason, live = self.stale_reason(holder, st)
            if reason is None:
                raise RunDirBusy(
                    f"{self.path.parent} is in use by another calm-train launch ({describe_holder(holder)}; "
                    f"{live}, {self.path}). Fix: wait for it to finish or "
                    f"stop it, or use another run_dir; delete {self.path} only after making sure that launch is gone "
                    f"(a holder whose lock is deleted stops at its next step)")
            self._take_over(holder, st, reason)
        raise RunDirBusy(f"{self.path}: could not take the lock (other launches keep taking it). Fix: launch one "
                         "run per run_dir")

    def _take_over(self, holder: dict, st: os.stat_result, reason: str) -> None:
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return                               # another recoverer won
        if os.stat(aside).st_ino != st.st_ino:
            # between our look and our rename another launch recovered it and took a fresh lock: give it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return
        os.unlink(aside)
        self.log(f"took over the stale lock {self.path} of {describe_holder(holder)}: {reason}")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.beat_s):
                try:
                    self.lost = self._lost_reason()
                    if self.lost is not None:
                        return
                    self._held_record["beat"] += 1
                    _write_record(self._fd, self._held_record)
                except OSError:
                    pass                         # a transient file-system error: the next beat retries

        self._stop.clear()
        self._thread = threading.Thread(target=beat, name="calm-train-lock-heartbeat", daemon=True)
        self._thread.start()

    def _lost_reason(self) -> str | None:
        """Why the lock file is no longer the one we created (None: it still is)."""
        found = self._read()
        if found is None:
            return "it was deleted"
        holder, st = found
        if holder.get("token") != self.token or st.st_ino != self._ino:
            return f"it now belongs to {describe_holder(holder)}"
        return None

    def check(self) -> None:
        """Raise LockLost when the lock we hold is no longer ours; called before every write into the run
        directory (a metrics row, an evaluation, a checkpoint).  Costs one stat: the heartbeat reads the record."""
        if not self.held:
            return
        if self.lost is None:
            try:
                if os.stat(self.path).st_ino != self._ino:
                    self.lost = self._lost_reason()
            except FileNotFoundError:
                self.lost = "it was deleted"
        if self.lost is not None:
            raise LockLost(f"this launch lost its lock {self.path} ({self.lost}) and stops before writing into "
                           f"{self.path.parent} again. Fix: make sure only one launch uses this run_dir, then "
                           "relaunch the same command to resume from the newest checkpoint")

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._lost_reason() is None:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self.held, self._fd = False, None
