"""Model FLOPs per trained token (forward + backward = 3 x forward; frozen parts forward only) and MFU.

Counts matrix multiplies only (2 FLOPs per multiply-add), as MFU conventionally does:
backbone (projections, attention scores and values, SwiGLU MLP), CALM input compression, energy
head (x N samples), frozen autoencoder encoder (forward only), AR vocabulary head.

MFU has one meaning: model FLOP/s per device over the device's peak.  The peak is `train.peak_flops`
when set, else the vendor's dense bf16 spec for a known GPU (SPEC_PEAK_BF16), else a GEMM measured at
the start; `mfu_peak_source` names which.  The measured-GEMM figure is always reported too
(`mfu_measured`).  A measurement taken while the machine was busy can fall below what a step then
achieves; the measured peak is raised to the best achieved rate, so `mfu_measured` never exceeds 1.
"""
from __future__ import annotations

import time

import torch

from calm_train.config import AutoencoderArch, BackboneArch, ModelConfig


def backbone_forward_flops(b: BackboneArch, positions: int) -> float:
    """Forward FLOPs per position of the Transformer for a sequence of `positions` (causal: average context / 2)."""
    h, head_dim = b.hidden_size, b.hidden_size // b.num_heads
    qkvo = 2 * h * (h + 2 * b.kv_heads * head_dim + h)
    mlp = 2 * 3 * h * b.intermediate_size
    attention = 2 * 2 * h * positions / 2
    return b.num_layers * (qkvo + mlp + attention)


def encoder_forward_flops(ae: AutoencoderArch, patch_size: int) -> float:
    """Autoencoder encoder forward FLOPs per chunk of K tokens."""
    h, i = ae.hidden_size, ae.intermediate_size
    per_position_layer = 2 * 3 * h * i
    before = ae.num_encoder_layers // 2
    after = ae.num_encoder_layers - before
    return (patch_size * before * per_position_layer + 2 * patch_size * h * h + after * per_position_layer
            + 2 * h * 2 * ae.latent_size)


def decoder_forward_flops(ae: AutoencoderArch, patch_size: int, vocab_size: int) -> float:
    h, i = ae.hidden_size, ae.intermediate_size
    per_position_layer = 2 * 3 * h * i
    before = ae.num_decoder_layers // 2
    after = ae.num_decoder_layers - before
    return (2 * ae.latent_size * h + before * per_position_layer + 2 * h * patch_size * h
            + patch_size * after * per_position_layer + patch_size * 2 * h * vocab_size)


def energy_head_forward_flops(m: ModelConfig) -> float:
    """Per sample: noise embedding, the residual blocks and the final layer (hidden embedding shared)."""
    h, z, d = m.backbone.hidden_size, m.head.noise_size, m.ae.latent_size
    block = 2 * (2 * h * h + h * h + h * 2 * h + h * h)
    return 2 * z * h + m.head.num_blocks * block + 2 * (h * h + h * d)


def train_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training step per token (fwd + bwd of trained parts, fwd of frozen parts)."""
    k, v = m.patch_size, m.vocab_size or 0
    if m.kind == "autoencoder":
        per_chunk = encoder_forward_flops(m.ae, k) + decoder_forward_flops(m.ae, k, v)
        return 3 * per_chunk / k
    if m.kind == "ar":
        h = m.backbone.hidden_size
        return 3 * (backbone_forward_flops(m.backbone, seq_len) + 2 * h * v)
    h = m.backbone.hidden_size
    positions = seq_len // k
    compression = 2 * (k * h * 2 * h + 2 * h * h)
    head = 2 * h * h + m.head.num_samples * energy_head_forward_flops(m)
    trained = compression + backbone_forward_flops(m.backbone, positions) + head
    return (3 * trained + encoder_forward_flops(m.ae, k)) / k


# Dense (no sparsity) bf16 tensor-core peaks per GPU, from the vendor's data sheets; the first name
# contained in torch.cuda.get_device_name() wins.  H100 without "PCIe" is the SXM part (H100 NVL: unlisted).
SPEC_PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", None), ("H200", 989.4e12), ("H100", 989.4e12),
                  ("A100", 312e12))


def spec_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The spec bf16 peak of a known device name, else None (other dtypes: None)."""
    if dtype != torch.bfloat16:
        return None
    return next((peak for name, peak in SPEC_PEAK_BF16 if name in device_name), None)


class MFU:
    """Model FLOPs utilisation against the chosen peak, and against the measured GEMM peak."""

    def __init__(self, flops_per_token: float, world_size: int, measured: float, spec: float | None,
                 configured: float, device_name: str):
        self.flops_per_token, self.world_size, self.measured = flops_per_token, world_size, measured
        self.raised = False
        if configured:
            self.peak, self.source = configured, "train.peak_flops"
        elif spec:
            self.peak, self.source = spec, f"spec {device_name} bf16 dense"
        else:
            self.peak, self.source = None, "measured GEMM"

    def row(self, tokens_per_s: float) -> tuple[dict, str | None]:
        """Metrics keys mfu, mfu_peak_source, mfu_peak_tflops, mfu_measured; and a note the first time the
        measured peak is raised."""
        achieved = self.flops_per_token * tokens_per_s / self.world_size
        note = None
        if achieved > self.measured:
            if not self.raised:
                note = (f"MFU: the GEMM peak measured at the start ({self.measured / 1e12:.4g} TFLOP/s) is below "
                        f"the achieved {achieved / 1e12:.4g} TFLOP/s (the machine was busy while measuring); the "
                        "measured peak follows the best achieved rate from now on")
            self.measured, self.raised = achieved, True
        peak = self.peak or self.measured
        return {"mfu": achieved / peak, "mfu_peak_source": self.source, "mfu_peak_tflops": peak / 1e12,
                "mfu_measured": achieved / self.measured}, note


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.3) -> float:
    """Achieved FLOP/s of a large square GEMM on this device: the denominator of MFU when none is configured."""
    n = 2048 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    _sync(device)
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
