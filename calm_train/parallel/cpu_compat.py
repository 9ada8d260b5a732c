"""CPU shims for megatron-core 0.16.1, applied only where CUDA is absent.

megatron-core hard-codes a few CUDA calls on paths we use (measured in
shared/notes/megatron_cpu.md):

* `torch.cuda.current_device()`: sequence-parallel gathers/scatters, p2p buffers,
  GlobalMemoryBuffer, dist-checkpoint save.  On CPU it now names the CPU device.
* `torch.cuda.synchronize()`: dist-checkpoint save preload.  A no-op on CPU.
* CUDA RNG state get/set in `tensor_parallel.random`: activation recompute saves and
  restores it.  On CPU there is no CUDA RNG state: an empty state, restore is a no-op.

`enable()` is idempotent and does nothing when CUDA is available.
"""
from __future__ import annotations

import torch

_ENABLED = False


def _empty_cuda_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _ignore_cuda_rng_state(*args, **kwargs) -> None:
    return None


def enable() -> bool:
    """Install the shims when CUDA is absent; return whether they are active."""
    global _ENABLED
    if _ENABLED or torch.cuda.is_available():
        return _ENABLED
    from megatron.core.tensor_parallel import random as megatron_random

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    megatron_random._get_cuda_rng_state = _empty_cuda_rng_state
    megatron_random._set_cuda_rng_state = _ignore_cuda_rng_state
    _ENABLED = True
    return True
