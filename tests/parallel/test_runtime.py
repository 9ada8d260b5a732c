"""Runtime: process group + megatron groups can be built, rebuilt and torn down repeatedly in one
process; seeding makes weights reproducible; CPU shims are idempotent.  (Multi-process layouts
through `init_distributed` are exercised by tests/parallel/test_layouts.py.)"""
import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from calm_train.parallel import cpu_compat, runtime


def test_pick_device_matches_the_machine():
    device, backend = runtime.pick_device()
    expected = ("cuda", "nccl") if torch.cuda.is_available() else ("cpu", "gloo")
    assert (device.type, backend) == expected


def test_init_and_destroy_twice_in_one_process():
    for seed in (1, 2):
        world = runtime.init_distributed(tp=1, pp=1, seed=seed)
        assert (world.rank, world.world_size, world.tp, world.pp, world.dp) == (0, 1, 1, 1, 1)
        assert parallel_state.model_parallel_is_initialized()
        assert parallel_state.get_tensor_model_parallel_world_size() == 1
        assert parallel_state.get_data_parallel_world_size() == 1
        runtime.destroy()
        assert not dist.is_initialized() and not parallel_state.model_parallel_is_initialized()
    runtime.destroy()                                                   # idempotent when nothing is up


def test_layout_is_rebuilt_without_tearing_down_the_process_group():
    with runtime.single_process(seed=0):
        group = dist.group.WORLD
        runtime.init_distributed(tp=1, pp=1, seed=0)
        assert dist.group.WORLD is group and parallel_state.model_parallel_is_initialized()
        with pytest.raises(ValueError, match=r"parallel.tp x parallel.pp = 2 x 1 does not divide the 1 processes"):
            runtime.init_distributed(tp=2, pp=1)
    assert not dist.is_initialized()


def test_single_process_seeds_torch_reproducibly():
    draws = []
    for _ in range(2):
        with runtime.single_process(seed=11):
            draws.append(torch.rand(5))
    with runtime.single_process(seed=12):
        other = torch.rand(5)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], other)


def test_single_process_refuses_an_existing_group():
    with runtime.single_process(seed=0):
        with pytest.raises(RuntimeError, match="a process group already exists"):
            with runtime.single_process(seed=0):
                pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims apply only without CUDA")
def test_cpu_shims_are_idempotent():
    assert cpu_compat.enable() and cpu_compat.enable()
    assert torch.cuda.current_device() == torch.device("cpu")
    from megatron.core.tensor_parallel import random as megatron_random
    assert megatron_random._get_cuda_rng_state().numel() == 0
