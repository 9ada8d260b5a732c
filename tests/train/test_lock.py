"""One run per run directory (calm_train/train/lock.py), with real processes.

Two real launches on one run_dir: the second exits 1 at once naming the holder's host and pid, the first
finishes with exactly one metrics row per step.  A lock whose holder was killed with kill -9, one that holds
our own SLURM_JOB_ID (a requeued job) and one whose heartbeat stopped are taken over; live ones are not.
"""
import errno
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from runs import Job, calm_train, metrics, wait_gone  # noqa: E402

from calm_train.errors import UserError  # noqa: E402
from calm_train.train.lock import LockLost, RunDirBusy, RunLock  # noqa: E402

pytestmark = pytest.mark.timeout(600)

HOLD = """
import socket, sys, time
from calm_train.train.lock import RunLock
if len(sys.argv) > 3:
    socket.gethostname = lambda: sys.argv[3]          # a holder on another host
RunLock(sys.argv[1], timeout_s=float(sys.argv[2])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def holder(run_dir: pathlib.Path, timeout_s: float = 600, *host: str, **env: str) -> subprocess.Popen:
    """A real process that takes the lock of run_dir and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(timeout_s), *host], stdout=subprocess.PIPE,
                            text=True,
                            env={**os.environ, **env})
    assert proc.stdout.readline().strip() == "held"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=60)


def test_second_launch_on_a_busy_run_dir_exits_at_once_naming_the_holder(tiny_data, tmp_path):
    run = tmp_path / "ar"
    args = ["train", "tiny_ar", f"run_dir={run}", f"data.train={tiny_data}", "train.steps=4", "train.save_every=2",
            "logging.progress=false"]
    first = Job(1, args, tmp_path / "first.log")
    first.wait_for_step(run, 1)
    os.kill(first.proc.pid, signal.SIGSTOP)               # hold it mid-run, lock and all
    try:
        second = calm_train(*args, check=False)
        rows = metrics(run)
    finally:
        os.kill(first.proc.pid, signal.SIGCONT)
    assert second.returncode == 1
    line = next(x for x in second.stderr.splitlines() if "error:" in x)
    assert f"{run} is in use by another calm-train launch (host {socket.gethostname()}, pid {first.proc.pid}" in line
    assert f"Fix: wait for it to finish or stop it, or use another run_dir; delete {run}/.lock only after making " \
           "sure that launch is gone" in line, line
    assert first.wait() == 0, first.output()[-3000:]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]           # one row per step: nobody else wrote
    assert metrics(run)[:len(rows)] == rows
    assert not (run / ".lock").exists()                                # released at the end


def test_a_killed_holders_lock_is_taken_over_and_a_live_one_is_not(tmp_path):
    proc = holder(tmp_path)
    with pytest.raises(RunDirBusy, match=f"host {socket.gethostname()}, pid {proc.pid}"):
        RunLock(tmp_path, timeout_s=600).acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    wait_gone(proc.pid)
    logs = []
    lock = RunLock(tmp_path, timeout_s=600, log=logs.append)
    lock.acquire()
    assert len(logs) == 1 and logs[0].startswith(f"took over the stale lock {tmp_path}/.lock of host "
                                                 f"{socket.gethostname()}, pid {proc.pid}, started "), logs
    assert logs[0].endswith(f"its process {proc.pid} on this host is gone"), logs
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists() and not list(tmp_path.glob(".lock*"))


def test_a_lock_of_our_own_slurm_job_is_taken_over(tmp_path, monkeypatch):
    """A requeued job runs again under the same SLURM_JOB_ID while its previous run's lock may still be there."""
    proc = holder(tmp_path, SLURM_JOB_ID="4242")
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "4243")
        with pytest.raises(RunDirBusy, match="Slurm job 4242"):
            RunLock(tmp_path, timeout_s=600).acquire()
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        logs = []
        lock = RunLock(tmp_path, timeout_s=600, log=logs.append)
        lock.acquire()
        assert "it holds our own Slurm job id 4242 (a requeued job)" in logs[0]
        lock.release()
    finally:
        stop(proc)


def test_another_hosts_lock_is_judged_by_its_heartbeat_counter_not_by_the_clocks(tmp_path):
    """Clock skew: the lock's mtime says nothing (here an hour in the past or the future); its counter does."""
    proc = holder(tmp_path, 0.5, "another-node")         # beats every 0.05 s
    try:
        past = time.time() - 3600                         # its clock an hour behind ours
        os.utime(tmp_path / ".lock", (past, past))
        with pytest.raises(RunDirBusy, match=f"host another-node, pid {proc.pid}, .*; its heartbeat advanced within"):
            RunLock(tmp_path, timeout_s=0.5).acquire()
    finally:
        stop(proc)
    future = time.time() + 3600                           # a dead holder whose clock is an hour ahead of ours
    os.utime(tmp_path / ".lock", (future, future))
    started = time.monotonic()
    assert take_over(tmp_path, timeout_s=1).endswith("did not advance in 1s (train.lock_timeout=1)")
    assert time.monotonic() - started < 5


def test_the_heartbeat_counts_in_the_lock(tmp_path):
    lock = RunLock(tmp_path, timeout_s=0.5)                # a beat every timeout / 10 = 0.05 s
    lock.acquire()
    record = json.loads((tmp_path / ".lock").read_text())
    assert record["beat"] == 0 and record["beat_s"] == 0.05
    time.sleep(0.5)
    beats = json.loads((tmp_path / ".lock").read_text())["beat"]
    assert beats >= 3, beats
    lock.release()


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_holder_whose_lock_was_deleted_or_taken_stops_before_its_next_write(tmp_path):
    lock = RunLock(tmp_path, timeout_s=0.5)
    lock.acquire()
    lock.check()                                          # ours: nothing to say
    (tmp_path / ".lock").unlink()                         # what the old refusal told users to do
    with pytest.raises(LockLost, match=f"this launch lost its lock {tmp_path}/.lock \\(it was deleted\\) and stops"):
        lock.check()
    lock.release()
    lock = RunLock(tmp_path, timeout_s=0.5)
    lock.acquire()
    (tmp_path / ".lock").unlink()
    other = RunLock(tmp_path, timeout_s=600)              # a second launch takes the run directory
    other.acquire()
    wait_until(lambda: lock.lost is not None)             # the heartbeat found out by itself
    assert lock.lost == f"it now belongs to host {socket.gethostname()}, pid {os.getpid()}, started " \
        f"{json.loads((tmp_path / '.lock').read_text())['started']}"
    with pytest.raises(LockLost, match="Fix: make sure only one launch uses this run_dir, then relaunch"):
        lock.check()
    lock.release()                                        # leaves the new holder's lock alone
    assert json.loads((tmp_path / ".lock").read_text())["token"] == other.token
    other.release()


def test_a_training_run_that_lost_its_lock_exits_without_writing_again(tiny_data, tmp_path):
    """kill -STOP the run, delete its lock and take the run directory, kill -CONT: it stops with one line."""
    run = tmp_path / "ar"
    args = ["train", "tiny_ar", f"run_dir={run}", f"data.train={tiny_data}", "train.steps=100000",
            "train.save_every=0", "train.eval_every=0", "train.lock_timeout=2", "logging.progress=false"]
    job = Job(1, args, tmp_path / "run.log")
    job.wait_for_step(run, 2)
    os.kill(job.proc.pid, signal.SIGSTOP)
    rows = metrics(run)
    (run / ".lock").unlink()
    other = RunLock(run, timeout_s=600)
    other.acquire()
    os.kill(job.proc.pid, signal.SIGCONT)
    assert job.wait() == 1, job.output()[-3000:]
    line = job.output().strip().splitlines()[-1]
    assert line.startswith(f"calm-train train: error: this launch lost its lock {run}/.lock (it now belongs to host "
                           f"{socket.gethostname()}, pid {os.getpid()}"), job.output()[-3000:]
    assert len(metrics(run)) <= len(rows) + 1             # at most the row that was being written at the stop
    assert not list(run.glob("checkpoints/*"))
    assert json.loads((run / ".lock").read_text())["token"] == other.token
    other.release()


def proc_stat(pid: int) -> list[str]:
    """Fields 3... of /proc/PID/stat: [0] the state, [19] the start time in ticks after boot (field 22)."""
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def take_over(run_dir: pathlib.Path, timeout_s: float = 600) -> str:
    """Acquire the lock of run_dir (it must be taken over) and release it; the takeover's log line."""
    logs = []
    lock = RunLock(run_dir, timeout_s=timeout_s, log=logs.append)
    lock.acquire()
    lock.release()
    assert logs[-1].startswith(f"took over the stale lock {run_dir}/.lock of "), logs
    return logs[-1]


def test_a_zombie_holder_is_dead(tmp_path):
    """kill -9 of a holder whose parent has not reaped it yet: os.kill(pid, 0) still succeeds, the lock is stale."""
    proc = holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    wait_until(lambda: proc_stat(proc.pid)[0] == "Z")          # we are its parent and do not wait() yet
    assert take_over(tmp_path).endswith(f"its process {proc.pid} on this host is dead (a zombie not yet reaped by "
                                        "its parent)")
    proc.wait(timeout=60)


def test_a_reused_pid_or_an_earlier_boot_does_not_keep_a_lock(tmp_path):
    """The holder died and its pid now names another live process (here: the lock rewritten to name one)."""
    proc = holder(tmp_path)
    stop(proc)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        record = json.loads((tmp_path / ".lock").read_text())
        (tmp_path / ".lock").write_text(json.dumps({**record, "pid": other.pid}))
        assert take_over(tmp_path).endswith(f"pid {other.pid} now belongs to another process (started at tick "
                                            f"{proc_stat(other.pid)[19]} "
                                            f"after boot, the holder at {record['pid_start']})")
    finally:
        stop(other)
    (tmp_path / ".lock").write_text(json.dumps({**record, "pid": os.getpid(), "boot_id": "an-earlier-boot"}))
    assert take_over(tmp_path).endswith(f"this host was rebooted since its process {os.getpid()} took it "
                                        "(boot id an-earlier-boot)")


def test_a_suspended_holder_on_this_host_is_not_taken_over(tmp_path):
    """kill -STOP longer than lock_timeout (a Slurm suspend): its heartbeat stops, its process lives."""
    proc = holder(tmp_path, timeout_s=0.5)
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(1.5)
        with pytest.raises(RunDirBusy, match=f"pid {proc.pid}"):
            RunLock(tmp_path, timeout_s=0.5).acquire()
        os.kill(proc.pid, signal.SIGCONT)
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == proc.pid
    finally:
        stop(proc)


def test_a_lock_written_on_a_full_disk_is_absent_and_an_empty_one_is_stale(tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "pwrite", full_disk)
        with pytest.raises(UserError, match=f"cannot create the lock {tmp_path}/.lock: No space left on device. "
                                            "Fix: free space"):
            RunLock(tmp_path, timeout_s=600).acquire()
    assert list(tmp_path.iterdir()) == []                  # complete or absent: nothing is left behind
    lock = RunLock(tmp_path, timeout_s=600)                # the disk has room again
    lock.acquire()
    lock.release()
    (tmp_path / ".lock").write_text("")                    # what an older writer left on a full disk
    past = time.time() - 10
    os.utime(tmp_path / ".lock", (past, past))
    assert take_over(tmp_path).endswith("it is empty or unreadable (0 bytes) and was written 10s ago")
    monkeypatch.setattr("calm_train.train.lock.UNREADABLE_S", 1.0)
    (tmp_path / ".lock").write_text('{"host": "another-n')  # a fresh one: stale once it stayed so for a while
    started = time.monotonic()
    assert take_over(tmp_path).endswith("it is empty or unreadable (19 bytes) and stayed so for 1s")
    assert time.monotonic() - started >= 1
