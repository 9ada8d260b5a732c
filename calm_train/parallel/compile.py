"""torch.compile of the training hot paths (`perf.compile=on`), applied in place before DeepSpeed wraps
the model: parameter names, state_dict keys and checkpoints do not change.

* every backbone layer (megatron's TransformerLayer): RMSNorm, the q/k/v and output projections, RoPE,
  the SwiGLU MLP and the residual adds become fused graphs.  SDPA is traced as one op; the flash-attn-4
  kernel is excluded from tracing (`torch.compiler.disable`) and runs eagerly between the graphs.
* CALM's energy head + energy loss (`CALM.head_loss`): the head's N samples per position and the
  [N, M] / [N, N] distance matrices of the energy score, one graph for forward and one for backward.

Noise draws (one generator per sample) and the frozen autoencoder stay eager.  Results equal eager
execution up to floating-point rounding (fused kernels keep intermediates in registers).
"""
from __future__ import annotations

import torch
from torch import nn


def compile_hot_paths(model: nn.Module, backend: str = "inductor") -> list[str]:
    """Compile this stage's hot paths in place; returns what was compiled (for the run's log line).
    backend: torch.compile's (tests trace with "aot_eager", which generates no kernels)."""
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
