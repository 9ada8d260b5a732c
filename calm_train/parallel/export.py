"""One full fp32 state dict from a model sharded over TP x PP x ZeRO, with the keys of the same
model built in one process (tp = pp = 1).

* ZeRO: each parameter's fp32 master is assembled from the optimizer partitions
  (`safe_get_full_fp32_param`, a collective over the data-parallel group); stage 0 keeps it whole.
* TP: megatron tags sharded parameters with `partition_dim` and `partition_stride`; a strided
  shard (SwiGLU's fc1 holds [gate_r; up_r]) is re-interleaved as [gate; up].
* PP: megatron numbers a stage's layers locally (`layers.0`) and records the global
  `layer_number`; keys are renamed to the global index.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from megatron.core import parallel_state as ps
from torch import nn

_LAYER = re.compile(r"^(.*\blayers)\.(\d+)$")


def _global_layer_prefixes(model: nn.Module) -> dict[str, str]:
    prefixes = {}
    for name, module in model.named_modules():
        match = _LAYER.match(name)
        if match and hasattr(module, "layer_number"):
            prefixes[name + "."] = f"{match.group(1)}.{module.layer_number - 1}."
    return prefixes


def _rename(name: str, prefixes: dict[str, str]) -> str:
    for local, global_ in prefixes.items():
        if name.startswith(local):
            return global_ + name[len(local):]
    return name


def _gather_tensor_parallel(shard: torch.Tensor, dim: int, stride: int) -> torch.Tensor:
    group = ps.get_tensor_model_parallel_group()
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, shard.contiguous(), group=group)
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(len(shards))], dim=dim)


def full_state_dict(model: nn.Module, world) -> dict[str, torch.Tensor]:
    """Every rank calls (collectives); rank 0 gets the whole fp32 state dict, the others {}."""
    prefixes = _global_layer_prefixes(model)
    local = {}
    for name, p in model.named_parameters():
        full = safe_get_full_fp32_param(p)
        tensor = (p.detach() if full is None else full).float()
        if world.tp_size > 1 and getattr(p, "tensor_model_parallel", False):
            tensor = _gather_tensor_parallel(tensor, p.partition_dim, getattr(p, "partition_stride", 1))
        local[_rename(name, prefixes)] = tensor.cpu()
    params = {name for name, _ in model.named_parameters()}
    for name, buf in model.state_dict().items():
        if name not in params and isinstance(buf, torch.Tensor) and not name.endswith("_extra_state"):
            local[_rename(name, prefixes)] = (buf.float() if buf.is_floating_point() else buf).cpu()
    contributes = world.dp_rank == 0 and world.tp_rank == 0
    gathered = [None] * world.world_size if world.rank == 0 else None
    dist.gather_object(local if contributes else {}, gathered, dst=0)
    if world.rank != 0:
        return {}
    return {k: v for part in gathered for k, v in part.items()}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The inverse of full_state_dict: copy this rank's TP shard of this stage's layers from a full
    (tp = pp = 1) state dict into `model` (before DeepSpeed wraps it).  Every key must be present."""
    prefixes = _global_layer_prefixes(model)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith("_extra_state"):
                continue
            key = _rename(name, prefixes)
            if key not in state:
                raise KeyError(f"load_full_state_dict: the state dict has no '{key}'. Fix: export it from a "
                               "model of the same config (TrainEngine.state_for_export)")
            full = state[key]
            if tp > 1 and getattr(tensor, "tensor_model_parallel", False):
                stride, dim = getattr(tensor, "partition_stride", 1), tensor.partition_dim
                pieces = full.chunk(stride * tp, dim=dim)
                full = torch.cat([pieces[j * tp + tp_rank] for j in range(stride)], dim=dim)
            tensor.copy_(full.to(tensor.dtype))
