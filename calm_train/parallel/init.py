"""Layout-independent initialisation: any tp x pp x dp layout starts from the weights of the 1-process run.

Each parameter is drawn in its full (tp = pp = 1) shape from a generator seeded by (train.seed, its
global name: the name it has in the tp = pp = 1 model, with pipeline layers renumbered globally), then
this rank keeps its tensor-parallel slice (megatron's partition_dim / partition_stride).  The weights
of a parameter therefore depend on neither the layout nor which other parameters a stage holds, and no
seed checkpoint is needed.

The distributions are the ones the modules' constructors use (megatron-core's and ours):
    weights of linear and embedding layers                       N(0, model.init_std)
    megatron's output layers (attention linear_proj, MLP linear_fc2)   N(0, init_std / sqrt(2 num_layers))
    norm weights (1), biases (0), the energy head's last layer (0): kept as constructed
A parameter whose constructor set one value everywhere is already the same in every layout, so it is
kept; every other one is redrawn.
"""
from __future__ import annotations

import hashlib
import math
import re

import torch
from megatron.core import parallel_state as ps
from torch import nn

from calm_train.config import ModelConfig
from calm_train.parallel.export import global_names, tensor_parallel_shard

OUTPUT_LAYERS = re.compile(r"\.(self_attention\.linear_proj|mlp\.linear_fc2)\.weight$")


def generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator of its own for (seed, global parameter name)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def init_std(name: str, model_cfg: ModelConfig) -> float:
    """The standard deviation of a randomly initialised parameter, by its global name."""
    if OUTPUT_LAYERS.search(name):
        return model_cfg.init_std / math.sqrt(2.0 * model_cfg.backbone.num_layers)
    return model_cfg.init_std


def _full_shape(param: torch.Tensor) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= ps.get_tensor_model_parallel_world_size()
    return shape


@torch.no_grad()
def initialise(model: nn.Module, model_cfg: ModelConfig, seed: int) -> None:
    """Redraw every randomly initialised parameter of this rank's `model` (its stage, its TP shard)."""
    names = global_names(model)
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        if flat.numel() > 1 and bool((flat == flat[0]).all()):
            continue
        full = torch.empty(_full_shape(param)).normal_(0.0, init_std(names[name], model_cfg),
                                                       generator=generator(seed, names[name]))
        if getattr(param, "tensor_model_parallel", False):
            full = tensor_parallel_shard(param, full)
        param.copy_(full.to(param.dtype))
