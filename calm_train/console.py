"""Where a command's output goes: results on stdout, everything else on stderr, each library note once.

`quiet_libraries()` runs before a command imports the training stack:
- DeepSpeed's logger writes to the stdout of the moment it is created (at import), and without
  DS_ACCELERATOR set it logs "Setting accelerator to CPU" there: DeepSpeed is imported here with
  stdout pointing at stderr, so its logger writes to stderr for the rest of the process.
- Notes that tell a calm-train user nothing are dropped: optional fused kernels not installed
  (Transformer Engine, Apex), megatron's deprecation of its own default, deprecations inside the
  libraries' own calls, a GPU tuning hint on a CPU, and torch's CUDA_HOME note.
- On ranks other than 0 (RANK set by torchrun or srun) library warnings are not shown at all: rank 0
  shows each once.
`stdout_to_stderr()` wraps the work of a command whose stdout is its result (eval, generate).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

NOISE = [  # (category, message regex)
    (UserWarning, r"(Transformer Engine and )?Apex (is|are) not installed"),
    (UserWarning, r"full scope is deprecated"),
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated"),
]
CPU_NOISE = [(UserWarning, r"When using async grad allreduce it is recommended to set the environment variable "
                           r"CUDA_DEVICE_MAX_CONNECTIONS")]


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def stdout_to_stderr():
    """While the block runs, anything printed to sys.stdout lands on stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def quiet_libraries() -> None:
    """Route and filter library output for this process (idempotent); imports DeepSpeed."""
    import torch
    for category, message in NOISE + ([] if torch.cuda.is_available() else CPU_NOISE):
        warnings.filterwarnings("ignore", message=message, category=category)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if int(os.environ.get("RANK", "0")) != 0:
        warnings.simplefilter("ignore")
        logging.getLogger("DeepSpeed").addFilter(_ErrorsOnly())
    with stdout_to_stderr():
        import deepspeed  # noqa: F401 - its logger binds to the stream that is stdout now
