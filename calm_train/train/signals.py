"""SIGTERM / SIGUSR1 (as forwarded by launchers and Slurm) and SIGINT (Ctrl-C) ask the run to checkpoint and exit.

The handler only records the request; the loop finishes its current step, all ranks agree
(any rank's request stops every rank), save, and the process exits with EXIT_REQUEUE (75).
A second SIGINT does not wait for the save: it raises KeyboardInterrupt where the process is,
and the run exits with EXIT_ABORTED (130) without writing a checkpoint.
"""
from __future__ import annotations

import signal

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

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
