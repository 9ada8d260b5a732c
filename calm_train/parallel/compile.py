"""torch.compile of the training hot paths (`perf.compile=on`), applied in place before DeepSpeed wraps
the model: parameter names, state_dict keys and checkpoints do not change.

* every backbone layer (megatron's TransformerLayer): RMSNorm, the q/k/v and output projections, RoPE,
  the SwiGLU MLP and the residual adds become fused graphs.  SDPA is traced as one op; the flash-attn-4
  kernel is excluded from tracing (`torch.compiler.disable`) and runs eagerly between the graphs.
* CALM's energy head + energy loss (`CALM.head_loss`): the head's N samples per position and the
  [N, M] / [N, N] distance matrices of the energy score, one graph for forward and one for backward.

Noise draws (one generator per sample) and the frozen autoencoder stay eager.  Results equal eager
execution up to floating-point rounding (fused kernels keep intermediates in registers).
megatron-core 0.16.1's RowParallelLinear passes `tp_group=None` on every forward, and the lookup of
the default group then calls `warnings.warn` (a deprecation notice), which Dynamo cannot trace: it
would split every layer at its output projections.  `_default_tp_group` returns the same group without
the notice (installed only when compiling).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import layers as megatron_layers
from torch import nn

_megatron_tp_group_lookup = megatron_layers.get_tensor_model_parallel_group_if_none


def _default_tp_group(tp_group, is_expert=False, check_initialized=True):
    if tp_group is None and not is_expert and dist.is_initialized() and parallel_state.is_initialized():
        return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)
    return _megatron_tp_group_lookup(tp_group, is_expert, check_initialized)


def compile_hot_paths(model: nn.Module, backend: str = "inductor") -> list[str]:
    """Compile this stage's hot paths in place; returns what was compiled (for the run's log line).
    backend: torch.compile's (tests trace with "aot_eager", which generates no kernels)."""
    megatron_layers.get_tensor_model_parallel_group_if_none = _default_tp_group
    compiled = []
    backbone = getattr(model, "backbone", None)
    if backbone is not None and len(backbone.decoder.layers):
        for layer in backbone.decoder.layers:
            layer.compile(backend=backend)
        compiled.append(f"{len(backbone.decoder.layers)} backbone layers")
    if getattr(model, "generative_head", None) is not None:
        model.head_loss = torch.compile(model.head_loss, backend=backend)
        compiled.append("energy head + energy loss")
    return compiled
