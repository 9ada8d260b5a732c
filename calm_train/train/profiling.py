"""`train.profile=START:END`: a torch.profiler trace of those steps on rank 0, and peak memory.

The trace is Chrome/Perfetto JSON (open it in https://ui.perfetto.dev or chrome://tracing); every
profiled step is one `train_step N` range in it.  On CUDA a memory snapshot of the same steps is
written beside it (load it in https://pytorch.org/memory_viz).  Files:
    RUN_DIR/profile/trace_steps_START-END.json
    RUN_DIR/profile/memory_steps_START-END.pickle        (CUDA only)
A resumed run profiles the part of the window it still runs.
"""
from __future__ import annotations

import os
import pathlib
import resource
import sys

import torch

from calm_train.config import profile_steps

MEMORY_HISTORY_ENTRIES = 100_000


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak: the CUDA caching allocator's on a GPU, else the resident set size (RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # KiB on Linux, bytes on macOS
    return rss / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


class StepProfiler:
    """Call `begin(step)` before and `end(step)` after each training step (steps count from 1)."""

    def __init__(self, spec: str | None, run_dir: pathlib.Path, enabled: bool, device: torch.device, log):
        self.window = profile_steps(spec) if enabled and spec else None
        self.device, self.log = device, log
        self.profiler = self.step_range = None
        if self.window:
            start, end = self.window
            self.trace = run_dir / "profile" / f"trace_steps_{start}-{end}.json"
            self.snapshot = run_dir / "profile" / f"memory_steps_{start}-{end}.pickle"

    def begin(self, step: int) -> None:
        if self.window is None or not self.window[0] <= step <= self.window[1]:
            return
        if self.profiler is None:
            # kineto's own log: errors only on CUDA; nothing on a CPU (where it reports the missing GPU as an error)
            os.environ.setdefault("KINETO_LOG_LEVEL", "4" if self.device.type == "cuda" else "6")
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
            self.profiler.__enter__()
        self.step_range = torch.profiler.record_function(f"train_step {step}")
        self.step_range.__enter__()

    def end(self, step: int) -> None:
        if self.step_range is not None:
            self.step_range.__exit__(None, None, None)
            self.step_range = None
        if self.profiler is not None and step >= self.window[1]:
            self.close()

    def close(self) -> None:
        """Stop and write the files (also when the run stops inside the window)."""
        if self.profiler is None:
            return
        if self.step_range is not None:
            self.step_range.__exit__(None, None, None)
            self.step_range = None
        self.profiler.__exit__(None, None, None)
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(self.trace))
        written = [self.trace]
        if self.device.type == "cuda":
            torch.cuda.memory._dump_snapshot(str(self.snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(self.snapshot)
        self.profiler, self.window = None, None
        self.log(f"profile written: {', '.join(str(p) for p in written)}")
