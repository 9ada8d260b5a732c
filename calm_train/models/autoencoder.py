"""The CALM autoencoder: a chunk of K tokens <-> one latent vector z (CALM, Section 2).

Encoder: embed each of the K tokens -> residual SwiGLU layers (pre-RMSNorm) on every position
-> flatten K x hidden -> squeeze_layer to hidden -> the remaining layers -> RMSNorm ->
hidden_to_latent -> (mean, log_std) of the posterior q(z | chunk) = N(mean, diag(exp(log_std))^2).
Decoder: latent_to_hidden -> half the layers -> expand_layer to K x hidden -> the remaining layers
-> RMSNorm -> logits with the encoder's embedding matrix (tied).  "Half" is num_layers // 2
before the K-merge/expansion and the rest after (the reference runs 2 x num_layers // 2 layers,
so the two agree for the even counts it uses).

Training objective (variational, robust to noise):
  1. each input token is replaced by id 0 with probability mask_prob (id 0, as in the reference
     release, so imported checkpoints see inputs exactly as in their training);
  2. z = mean + exp(log_std) * eps, eps ~ N(0, I), then dropout(ae_dropout) on z;
  3. loss = K * CE(decoder(z), tokens) + kl_weight * mean_chunks sum_d max(KL_d, kl_clamp),
     KL_d = 1/2 (mean_d^2 + std_d^2 - 1) - log_std_d, the per-dimension KL to N(0, 1).
All three draws come from the per-sample `SampleRNG` (always drawn, applied only in training,
so a sample's eps is the same in train and eval mode); eval mode applies no mask and no dropout.
Parameter names mirror the reference checkpoint keys (see the module attributes below).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from calm_train.config import AutoencoderArch
from calm_train.models.rng import SampleRNG

MASK_TOKEN_ID = 0


@dataclass
class AutoencoderLoss:
    loss: torch.Tensor              # scalar training objective (mean over the batch)
    recon_loss: torch.Tensor        # token cross-entropy, mean over tokens (not times K)
    kl: torch.Tensor                # clamped KL summed over dimensions, mean over chunks
    loss_per_sample: torch.Tensor   # [B] the objective of each sample alone


class RMSNorm(nn.Module):
    """Llama's RMSNorm: x / rms(x) * weight, computed in float32."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class AELayer(nn.Module):
    """x + mlp(norm(x))."""

    def __init__(self, arch: AutoencoderArch):
        super().__init__()
        self.mlp = SwiGLU(arch.hidden_size, arch.intermediate_size)
        self.layernorm = RMSNorm(arch.hidden_size, arch.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.layernorm(x))


def _run(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


class Encoder(nn.Module):
    def __init__(self, arch: AutoencoderArch, vocab_size: int, patch_size: int):
        super().__init__()
        H, n = arch.hidden_size, arch.num_encoder_layers
        self.embed_tokens = nn.Embedding(vocab_size, H)
        self.encoder_layers = nn.ModuleList(AELayer(arch) for _ in range(n))
        self.squeeze_layer = nn.Linear(patch_size * H, H)
        self.norm = RMSNorm(H, arch.norm_eps)
        self.hidden_to_latent = nn.Linear(H, 2 * arch.latent_size)
        self.split = n // 2

    def forward(self, tokens_BTK: torch.Tensor) -> torch.Tensor:
        """[B, T, 2D]: (mean, log_std) concatenated."""
        x_BTKH = _run(self.encoder_layers[:self.split], self.embed_tokens(tokens_BTK))
        x_BTH = _run(self.encoder_layers[self.split:], self.squeeze_layer(x_BTKH.flatten(-2)))
        return self.hidden_to_latent(self.norm(x_BTH))


class Decoder(nn.Module):
    def __init__(self, arch: AutoencoderArch, patch_size: int):
        super().__init__()
        H, n = arch.hidden_size, arch.num_decoder_layers
        self.latent_to_hidden = nn.Linear(arch.latent_size, H)
        self.decoder_layers = nn.ModuleList(AELayer(arch) for _ in range(n))
        self.expand_layer = nn.Linear(H, patch_size * H)
        self.norm = RMSNorm(H, arch.norm_eps)
        self.split, self.patch_size = n // 2, patch_size

    def forward(self, z_BTD: torch.Tensor, embedding_VH: torch.Tensor) -> torch.Tensor:
        """[B, T, K, V] logits (output weight tied to the encoder's embedding)."""
        x_BTH = _run(self.decoder_layers[:self.split], self.latent_to_hidden(z_BTD))
        x_BTKH = self.expand_layer(x_BTH).unflatten(-1, (self.patch_size, -1))
        x_BTKH = _run(self.decoder_layers[self.split:], x_BTKH)
        return F.linear(self.norm(x_BTKH), embedding_VH)


def clamped_kl(mean: torch.Tensor, log_std: torch.Tensor, kl_clamp: float) -> torch.Tensor:
    """Per-dimension max(KL(N(mean, std^2) || N(0, 1)), kl_clamp): below the clamp, constant (no gradient)."""
    kl = 0.5 * (mean.pow(2) + torch.exp(2 * log_std) - 1) - log_std
    return torch.clamp(kl, min=kl_clamp)


class Autoencoder(nn.Module):
    def __init__(self, arch: AutoencoderArch, vocab_size: int, patch_size: int, init_std: float = 0.02):
        super().__init__()
        self.arch, self.vocab_size, self.patch_size = arch, vocab_size, patch_size
        self.encoder = Encoder(arch, vocab_size, patch_size)
        self.decoder = Decoder(arch, patch_size)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def encode(self, tokens_BTK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean_BTD, log_std_BTD) of q(z | chunk)."""
        return self.encoder(tokens_BTK).chunk(2, dim=-1)

    def decode_logits(self, z_BTD: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_BTD, self.encoder.embed_tokens.weight)

    def decode(self, z_BTD: torch.Tensor) -> torch.Tensor:
        """Argmax tokens [B, T, K]."""
        return self.decode_logits(z_BTD).argmax(-1)

    @torch.no_grad()
    def posterior_samples(self, tokens_BTK: torch.Tensor, num: int, rng: SampleRNG) -> torch.Tensor:
        """[B, T, num, D]: z = mean + exp(log_std) * eps, eps ~ N(0, I) from the per-sample generators."""
        mean_BTD, log_std_BTD = self.encode(tokens_BTK)
        B, T, D = mean_BTD.shape
        self._check_rows(rng, B)
        eps_BTND = rng.normal(T, num, D, dtype=mean_BTD.dtype)
        return mean_BTD.unsqueeze(2) + torch.exp(log_std_BTD).unsqueeze(2) * eps_BTND

    def forward(self, tokens_BL: torch.Tensor, rng: SampleRNG) -> AutoencoderLoss:
        B, L = tokens_BL.shape
        K, D, arch = self.patch_size, self.arch.latent_size, self.arch
        if L % K:
            raise ValueError(f"Autoencoder: sequence length {L} is not a multiple of patch_size K={K}; "
                             "prepare the data with K-aligned sequences (data.seq_len % model.patch_size == 0)")
        self._check_rows(rng, B)
        T = L // K
        masked_BL = rng.bernoulli(arch.mask_prob, L)
        eps_BTD = rng.normal(T, D)
        keep_BTD = ~rng.bernoulli(arch.ae_dropout, T, D)

        inputs_BL = tokens_BL.masked_fill(masked_BL, MASK_TOKEN_ID) if self.training else tokens_BL
        mean_BTD, log_std_BTD = self.encode(inputs_BL.view(B, T, K))
        z_BTD = mean_BTD + torch.exp(log_std_BTD) * eps_BTD.to(mean_BTD.dtype)
        if self.training and arch.ae_dropout > 0:
            z_BTD = z_BTD * keep_BTD / (1 - arch.ae_dropout)

        logits_BTKV = self.decode_logits(z_BTD).float()
        ce_BL = F.cross_entropy(logits_BTKV.flatten(0, 2), tokens_BL.flatten(), reduction="none").view(B, L)
        kl_BT = clamped_kl(mean_BTD.float(), log_std_BTD.float(), arch.kl_clamp).sum(-1)
        loss_B = K * ce_BL.mean(1) + arch.kl_weight * kl_BT.mean(1)
        return AutoencoderLoss(loss=loss_B.mean(), recon_loss=ce_BL.mean(), kl=kl_BT.mean(), loss_per_sample=loss_B)

    @torch.no_grad()
    def reconstruction_accuracy(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Fraction of tokens decoded (argmax) from the posterior mean; no mask, no dropout."""
        B, L = tokens_BL.shape
        tokens_BTK = tokens_BL.view(B, L // self.patch_size, self.patch_size)
        mean_BTD, _ = self.encode(tokens_BTK)
        return (self.decode(mean_BTD) == tokens_BTK).float().mean()

    @staticmethod
    def _check_rows(rng: SampleRNG, batch: int) -> None:
        if len(rng) != batch:
            raise ValueError(f"Autoencoder: the SampleRNG has {len(rng)} rows for a batch of {batch}; "
                             "build it from the batch's sample ids (or narrow it to the batch's rows)")
