"""Rotary position embedding angles in megatron's layout (rotate-half, as Llama / Hugging Face).

megatron's SelfAttention rotates q and k itself (`apply_rotary_pos_emb`) given the angles
`freqs_S11D` = [positions, 1, 1, head_dim], the two halves equal:

    theta_i = base^(-2i / head_dim),   freqs[p] = concat(p * theta, p * theta).

Ours replaces megatron's RotaryEmbedding, whose forward moves its buffer to CUDA
unconditionally.  `offset` gives the absolute position of the first entry, so a KV-cached
decode step rotates its new keys/queries at the right positions.  The angles are computed
in float32 on every call and kept in no buffer, so `model.to(bf16)` cannot round them.
"""
from __future__ import annotations

import torch


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}: "
                             "choose model.backbone.num_heads so hidden_size/num_heads is even")
        self.head_dim, self.theta = head_dim, theta

    def forward(self, length: int, offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
        """Angles for positions offset .. offset+length-1: [length, 1, 1, head_dim], fp32."""
        inv_freq_D2 = self.theta ** (-torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32)
                                     / self.head_dim)
        pos_S = torch.arange(offset, offset + length, device=device, dtype=torch.float32)
        freqs_SD2 = torch.outer(pos_S, inv_freq_D2)
        return torch.cat([freqs_SD2, freqs_SD2], dim=-1)[:, None, None, :]
