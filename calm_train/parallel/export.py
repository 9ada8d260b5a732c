"""One full fp32 state dict from a model sharded over TP x PP x ZeRO, with the keys of the same
model built in one process (tp = pp = 1).

* ZeRO: each parameter's fp32 master is assembled from the optimizer partitions
  (`safe_get_full_fp32_param`, a collective over the data-parallel group); stage 0 keeps it whole.
* TP: megatron tags sharded parameters with `partition_dim` and `partition_stride`; a strided
  shard (SwiGLU's fc1 holds [gate_r; up_r]) is re-interleaved as [gate; up].
* PP: megatron numbers a stage's layers locally (`layers.0`) and records the global
  `layer_number`; keys are renamed to the global index.
* Adam's moments travel the same way (`full_optimizer_state`, `exp_avg/<name>`), and both load back
  into a built engine of any layout (`load_full_weights`, `load_full_optimizer_state`): resharding.
"""
from __future__ import annotations

import re

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)
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


def global_names(model: nn.Module) -> dict[str, str]:
    """Each parameter's name in the tp = pp = 1 model (pipeline layers renumbered globally)."""
    prefixes = _global_layer_prefixes(model)
    return {name: _rename(name, prefixes) for name, _ in model.named_parameters()}


def _gather_tensor_parallel(shard: torch.Tensor, dim: int, stride: int) -> torch.Tensor:
    group = ps.get_tensor_model_parallel_group()
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, shard.contiguous(), group=group)
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(len(shards))], dim=dim)


def _on_rank0(local: dict[str, torch.Tensor], world) -> dict[str, torch.Tensor]:
    """Every rank calls: the parts of the (dp 0, tp 0) rank of each pipeline stage, together on rank 0 ({} on the
    others).  Without pipeline stages rank 0 holds every tensor itself and nothing is sent (gather_object would
    pickle each one, even in a world of one)."""
    if world.pp_size == 1:
        return local if world.rank == 0 else {}
    contributes = world.dp_rank == 0 and world.tp_rank == 0
    gathered = [None] * world.world_size if world.rank == 0 else None
    dist.gather_object(local if contributes else {}, gathered, dst=0)
    return {k: v for part in gathered for k, v in part.items()} if world.rank == 0 else {}


def full_state_dict(model: nn.Module, world) -> dict[str, torch.Tensor]:
    """Every rank calls (collectives); rank 0 gets the whole fp32 state dict (a copy in host memory), the others {}."""
    prefixes = _global_layer_prefixes(model)
    local = {}
    for name, p in model.named_parameters():
        full = safe_get_full_fp32_param(p)
        tensor = (p.detach() if full is None else full).float()
        if world.tp_size > 1 and getattr(p, "tensor_model_parallel", False):
            tensor = _gather_tensor_parallel(tensor, p.partition_dim, getattr(p, "partition_stride", 1))
        local[_rename(name, prefixes)] = tensor.to("cpu", copy=True)     # a copy: training does not change it
    params = {name for name, _ in model.named_parameters()}
    for name, buf in model.state_dict().items():
        if name not in params and isinstance(buf, torch.Tensor) and not name.endswith("_extra_state"):
            local[_rename(name, prefixes)] = (buf.float() if buf.is_floating_point() else buf).to("cpu", copy=True)
    return _on_rank0(local, world)


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The inverse of full_state_dict: copy this rank's TP shard of this stage's layers from a full
    (tp = pp = 1) state dict into `model` (before DeepSpeed wraps it).  Every key must be present."""
    prefixes = _global_layer_prefixes(model)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith("_extra_state"):
                continue
            full = _full_entry(state, _rename(name, prefixes), "load_full_state_dict: the state dict")
            tensor.copy_(tensor_parallel_shard(tensor, full).to(tensor.dtype))


# ---------------------------------------------------------------------------------------------
# Adam's state under the same full names, and loading full weights / moments into a built engine

MOMENTS = ("exp_avg", "exp_avg_sq")


def _base_optimizer(optimizer):
    """The torch optimizer holding Adam's state: DeepSpeed's ZeRO and bf16 wrappers keep it in `.optimizer`
    (keyed by their flat fp32 partitions); at ZeRO stage 0 in fp32 it is the optimizer itself."""
    return getattr(optimizer, "optimizer", optimizer)


def _partitioned(p: torch.Tensor) -> bool:
    """DeepSpeed keeps this parameter's fp32 master and Adam state in flat partitions (ZeRO 1-3, bf16)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _adam_tensors(optimizer) -> list[torch.Tensor]:
    """The tensors Adam's state is keyed by: ZeRO-3's flat fp32 partitions (kept out of the param groups
    between steps), else the parameters of the torch optimizer's groups."""
    flat = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if flat is not None:
        return list(flat)
    return [p for group in _base_optimizer(optimizer).param_groups for p in group["params"]]


def init_adam_state(optimizer, step: int) -> None:
    """Create Adam's state {step, exp_avg = 0, exp_avg_sq = 0} where torch has not yet (it does so lazily
    at the first step; the values are the ones it would create) and link DeepSpeed's per-parameter views
    into it, so the moments can be read and written before the first step of an engine."""
    base = _base_optimizer(optimizer)
    on_device = base.defaults.get("fused") or base.defaults.get("capturable")
    for p in _adam_tensors(optimizer):
        state = base.state[p]
        if not state:
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu")
            state.update({key: torch.zeros_like(p, memory_format=torch.preserve_format) for key in MOMENTS})
    if hasattr(optimizer, "_hp_optimizer_states_linked"):      # ZeRO 1/2 and bf16 wrappers
        # ZeRO 1/2 link once, after the first param group's step, when the other groups have no state
        # yet: their views stay empty ("exp_avg not found in optimizer state fragment").  Link again.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def adam_step(optimizer) -> int:
    """Adam's step count (the bias-correction t; skipped steps do not count), the same on every rank."""
    base = _base_optimizer(optimizer)
    steps = [float(s["step"]) for s in base.state.values() if "step" in s]
    step = torch.tensor([max(steps, default=0.0)], dtype=torch.float64)
    dist.all_reduce(step, op=dist.ReduceOp.MAX)
    return int(step)


def _set_adam_step(optimizer, step: int) -> None:
    for state in _base_optimizer(optimizer).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].fill_(float(step))
        elif "step" in state:
            state["step"] = step


def _full_moment(p: torch.Tensor, optimizer, key: str) -> torch.Tensor:
    if _partitioned(p):
        return safe_get_full_optimizer_state(p, key)        # a collective over the data-parallel group
    return _base_optimizer(optimizer).state[p][key]


def full_optimizer_state(model: nn.Module, optimizer, world) -> tuple[dict[str, torch.Tensor], int]:
    """Every rank calls (collectives): rank 0 gets Adam's moments of every trainable parameter as
    `exp_avg/<name>` and `exp_avg_sq/<name>` in fp32, `<name>` as in full_state_dict (TP gathered with
    the same dims and strides, PP layers renamed, ZeRO partitions assembled); the others get {}.
    Every rank gets Adam's step count."""
    init_adam_state(optimizer, 0)
    prefixes = _global_layer_prefixes(model)
    local = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        for key in MOMENTS:
            tensor = _full_moment(p, optimizer, key).float()
            if world.tp_size > 1 and getattr(p, "tensor_model_parallel", False):
                tensor = _gather_tensor_parallel(tensor, p.partition_dim, getattr(p, "partition_stride", 1))
            local[f"{key}/{_rename(name, prefixes)}"] = tensor.to("cpu", copy=True)
    step = adam_step(optimizer)
    return _on_rank0(local, world), step


def tensor_parallel_shard(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This TP rank's slice of a full tensor for `param` (megatron's partition_dim / partition_stride)."""
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    stride, dim = getattr(param, "partition_stride", 1), param.partition_dim
    pieces = full.chunk(stride * tp, dim=dim)
    return torch.cat([pieces[j * tp + tp_rank] for j in range(stride)], dim=dim)


def _full_entry(state: dict, key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise KeyError(f"{source} has no '{key}'. Fix: write it from a model of the same config "
                       "(TrainEngine.state_for_export, full_optimizer_state)")
    return state[key]


def load_full_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (tp = pp = 1) state dict into the module of a built DeepSpeed engine: the module's
    own tensors (gathered and re-partitioned at ZeRO-3) and ZeRO's fp32 master copies."""
    zero3 = [p for p in model.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0, enabled=bool(zero3)):
        load_full_state_dict(model, state)
    prefixes = _global_layer_prefixes(model)
    for name, p in model.named_parameters():
        if _partitioned(p):
            full = _full_entry(state, _rename(name, prefixes), "the full state dict")
            safe_set_full_fp32_param(p, tensor_parallel_shard(p, full).float().to(p.device))


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict[str, torch.Tensor], step: int) -> None:
    """The inverse of full_optimizer_state for a built engine in any layout: this rank's TP shard of
    this stage's moments into its ZeRO partition (or the torch state at stage 0), step count `step`."""
    init_adam_state(optimizer, step)
    _set_adam_step(optimizer, step)
    base = _base_optimizer(optimizer)
    prefixes = _global_layer_prefixes(model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        for key in MOMENTS:
            full = _full_entry(state, f"{key}/{_rename(name, prefixes)}", "the optimizer state")
            shard = tensor_parallel_shard(p, full).float().to(p.device)
            if _partitioned(p):
                safe_set_full_optimizer_state(p, shard, key)
            else:
                base.state[p][key].copy_(shard)
