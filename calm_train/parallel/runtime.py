"""Process-group and megatron parallel-state set-up, the same code on CPU (gloo) and GPU (nccl).

`init_distributed(tp, pp, seed)` joins (or creates) the default process group from the
torchrun environment, builds megatron's tensor/pipeline/data-parallel groups and seeds
every RNG.  It can be called again in the same process with another layout: megatron's
groups are rebuilt, the default group is kept.  `single_process(seed)` is a world of one
for tests, evaluation and generation.
"""
from __future__ import annotations

import contextlib
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from calm_train.parallel import cpu_compat


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    backend: str
    rank: int
    world_size: int
    tp: int
    pp: int

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)


def pick_device() -> tuple[torch.device, str]:
    """cuda + nccl (the GPU of LOCAL_RANK) when CUDA is available, else cpu + gloo."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), "nccl"
    return torch.device("cpu"), "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(backend: str, device: torch.device, from_env: bool) -> None:
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend == "nccl":   # NCCL takes CUDA tensors only: small CPU collectives (losses, flags) go through gloo
        backend = "cuda:nccl,cpu:gloo"
    if from_env and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)                  # env:// as set by torchrun / srun launcher
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                world_size=1)


def seed_all(seed: int) -> None:
    """torch's CPU RNG (weights are built on CPU: identical for every TP size) and megatron's tracker; Python's
    and numpy's too, so that a checkpoint's RNG states (which hold them) are the same in every run of a seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    else:
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 0) -> Runtime:
    """Default process group (kept if present) + megatron groups for tp x pp (rebuilt) + seeds."""
    device, backend = pick_device()
    cpu_compat.enable()
    _init_process_group(backend, device, from_env=True)
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(f"parallel.tp x parallel.pp = {tp} x {pp} does not divide the {world} processes: "
                         f"launch a multiple of {tp * pp} processes or change parallel.tp/parallel.pp")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_all(seed)
    return Runtime(device=device, backend=backend, rank=dist.get_rank(), world_size=world, tp=tp, pp=pp)


def destroy() -> None:
    """Tear down megatron's groups and the default process group (safe when absent)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def single_process(seed: int = 0):
    """A world of one process (tp = pp = 1) for tests, evaluation and generation."""
    if dist.is_initialized():
        raise RuntimeError("single_process(): a process group already exists; call runtime.destroy() first "
                           "or use init_distributed() inside a launched job")
    device, backend = pick_device()
    _init_process_group(backend, device, from_env=False)
    try:
        yield init_distributed(tp=1, pp=1, seed=seed)
    finally:
        destroy()
