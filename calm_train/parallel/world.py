"""The process layout one trainer sees: ranks and sizes of the tensor/pipeline/data-parallel groups.

`build_world(cfg)` reads them from torch.distributed and megatron's parallel_state, so call it
after `runtime.init_distributed(tp, pp, seed)`.  `MegatronMPU` hands megatron's groups to
DeepSpeed, which expects an older `mpu` interface.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from calm_train.config import Config, ConfigError, validate_layout
from calm_train.parallel.runtime import pick_device


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def build_world(cfg: Config) -> World:
    """This rank's place in the layout; checks that the launched layout is the configured one."""
    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        raise RuntimeError("build_world(): no process groups yet. Fix: call "
                           "calm_train.parallel.runtime.init_distributed(tp, pp, seed) first")
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    if (tp, pp) != (cfg.parallel.tp, cfg.parallel.pp):
        raise ConfigError("parallel.tp", f"the process groups were built for tp={tp} pp={pp} but the config "
                          f"asks for tp={cfg.parallel.tp} pp={cfg.parallel.pp}",
                          "pass the config's parallel.tp/parallel.pp to runtime.init_distributed")
    validate_layout(cfg, dist.get_world_size())
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(),
                 tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=tp,
                 pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=pp,
                 dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                 device=pick_device()[0])


class MegatronMPU:
    """megatron's parallel_state in the shape DeepSpeed calls it.

    The model-parallel group is TP x PP, so DeepSpeed's gradient norm sums over every stage and
    tensor shard; a parameter replicated over TP (norm weights) counts once, on tensor rank 0
    (DeepSpeed asks `get_tensor_model_parallel_rank`).  `get_model_parallel_rank` is the rank in
    TP x PP, unique per shard, which DeepSpeed uses to name checkpoint files.
    """

    def __getattr__(self, name):
        return getattr(ps, name)

    def get_model_parallel_group(self):
        return ps.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(ps.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(ps.get_model_parallel_group())
