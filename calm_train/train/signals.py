"""SIGTERM / SIGUSR1 (as forwarded by launchers and Slurm) and SIGINT (Ctrl-C) ask the run to checkpoint and exit.

The handler only records the request; the loop finishes its current step, all ranks agree
(any rank's request stops every rank), save, and the process exits with EXIT_REQUEUE (75).
A second SIGINT does not wait for the save: it raises KeyboardInterrupt where the process is,
and the run exits with EXIT_ABORTED (130) without writing a checkpoint.

A torchrun worker runs in a session of its own, so nothing reaches it when torchrun itself is killed
(kill -9, an OOM kill): `watch_launcher` asks the kernel for SIGTERM when the parent dies (Linux
prctl(PR_SET_PDEATHSIG)) and, where that is missed, a thread sees its parent change and sends the same
SIGTERM; the worker obeys it as above (its ranks agree, save, exit 75), and the relaunch resumes.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt("second SIGINT")
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def signum(self) -> int:
        """The signal's number, 0 when none came (what the ranks agree on: train/loop.py)."""
        return int(signal.Signals[self.signal_name]) if self.signal_name else 0

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def watch_launcher(poll_s: float = 1.0) -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID set): SIGTERM to this process once its parent, the launcher, is gone:
    from the kernel at once (Linux), and from a daemon thread that polls the parent pid every `poll_s` seconds
    (this process is reparented).  Call it first thing: a launcher that dies before it is seen is missed."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()
    if sys.platform == "linux":
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        print(f"calm-train train: the launcher (torchrun, pid {launcher}) is gone: stopping as on SIGTERM",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
