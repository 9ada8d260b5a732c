"""CALM: next-vector prediction with an energy head (Shao et al. 2025, Sections 2-3).

A sequence of L tokens is cut into T = L/K chunks c_0 .. c_{T-1}.  Backbone input at position t
is the compression of chunk t,

    e_t = LayerNorm(W2 silu(W1 [E(c_t,1); ...; E(c_t,K)] + b1) + b2)        (embed_proj)

and the backbone output h_t predicts the latent of chunk t+1.  The loss is the energy score of
N head samples x_n ~ head(h_t) against M samples y_m ~ q(z | c_{t+1}) of the frozen
autoencoder's posterior, averaged over positions t = 0 .. T-2 and the batch.

Position handling: like the reference release we predict chunks 1 .. T-1 from chunks 0 .. T-2;
unlike it we feed all T chunks to the backbone and drop the last output from the loss.  The
outputs at t <= T-2 are identical either way (causal attention), and T positions keep the
sequence length a multiple of the TP size under sequence parallelism and equal to the
inference shape.  `predict_next_latents` returns all T positions; its last entry predicts the
chunk after the window (what generation uses).

The frozen autoencoder is passed in, never held: it is not a submodule, so it is in no
optimizer, ZeRO partition, gradient or CALM state_dict.  Pipeline stages: the first stage holds
`embed_tokens` + `embed_proj` (`embed`), the last stage the energy head (`loss_from_hidden`).
Parameter names follow the reference release (embed_tokens, embed_proj.{0,2,3}, generative_head).
"""
from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from torch import nn

from calm_train.config import ModelConfig
from calm_train.models.attention import KVCache
from calm_train.models.autoencoder import Autoencoder
from calm_train.models.backbone import Backbone, token_embedding, transformer_config
from calm_train.models.energy import EnergyHead, energy_score
from calm_train.models.rng import SampleRNG


def freeze(autoencoder: Autoencoder) -> Autoencoder:
    """The frozen autoencoder CALM trains against: eval mode, no parameter requires a gradient."""
    return autoencoder.eval().requires_grad_(False)


class CALM(MegatronModule):
    def __init__(self, model_cfg: ModelConfig, *, pre_process: bool = True, post_process: bool = True,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 recompute: str = "off"):
        if model_cfg.vocab_size is None:
            raise ValueError("CALM: model.vocab_size is unset; take it from the prepared data's dataset.json "
                             "before building the model")
        arch = model_cfg.backbone
        config = transformer_config(arch, sequence_parallel=sequence_parallel, dtype=params_dtype,
                                    init_std=model_cfg.init_std)
        super().__init__(config=config)
        self.model_cfg, self.patch_size = model_cfg, model_cfg.patch_size
        self.pre_process, self.post_process = pre_process, post_process
        h, K = arch.hidden_size, model_cfg.patch_size
        if pre_process:
            self.embed_tokens = token_embedding(model_cfg.vocab_size, config)
            self.embed_proj = nn.Sequential(nn.Linear(K * h, 2 * h), nn.SiLU(), nn.Linear(2 * h, h),
                                            nn.LayerNorm(h, eps=1e-6))
            for linear in (self.embed_proj[0], self.embed_proj[2]):
                nn.init.normal_(linear.weight, std=model_cfg.init_std)
                nn.init.zeros_(linear.bias)
            self.embed_proj.to(params_dtype)
        self.backbone = Backbone(arch, attention=model_cfg.attention, pre_process=pre_process,
                                 post_process=post_process, sequence_parallel=sequence_parallel,
                                 params_dtype=params_dtype, init_std=model_cfg.init_std, recompute=recompute)
        if post_process:
            self.generative_head = EnergyHead(h, model_cfg.ae.latent_size, model_cfg.head,
                                              model_cfg.init_std).to(params_dtype)

    def set_input_tensor(self, input_tensor) -> None:
        self.backbone.set_input_tensor(input_tensor)

    @property
    def sequence_multiple(self) -> int:
        """Inputs hold a multiple of this many chunks (the backbone's sequence_multiple)."""
        return self.backbone.sequence_multiple

    def chunks(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """[B, T, K] view of [B, L]; L must be a multiple of K."""
        B, L = tokens_BL.shape
        if L % self.patch_size:
            raise ValueError(f"CALM: sequence length {L} is not a multiple of model.patch_size="
                             f"{self.patch_size}; use K-aligned data (data.seq_len % model.patch_size == 0)")
        return tokens_BL.view(B, L // self.patch_size, self.patch_size)

    def embed(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """First stage: backbone input [T, B, H], e_t = embed_proj(concat of chunk t's K embeddings)."""
        emb_BTKH = self.embed_tokens(self.chunks(tokens_BL))
        return self.embed_proj(emb_BTKH.flatten(-2)).transpose(0, 1).contiguous()

    def hidden(self, tokens_BL: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Backbone outputs [B, T, H] of all stages in one process (h_t predicts chunk t+1)."""
        return self.backbone(self.embed(tokens_BL), kv_cache).transpose(0, 1)

    def loss_from_hidden(self, hidden_SBH: torch.Tensor, tokens_BL: torch.Tensor, rng: SampleRNG,
                         autoencoder: Autoencoder) -> torch.Tensor:
        """Last stage: mean energy loss of predicting chunks 1..T-1 from outputs 0..T-2."""
        head = self.model_cfg.head
        hidden_BTH = hidden_SBH.transpose(0, 1)[:, :-1]
        with torch.no_grad():
            targets_BTMD = autoencoder.posterior_samples(self.chunks(tokens_BL)[:, 1:], head.num_target_samples, rng)
        return self.head_loss(hidden_BTH, self.generative_head.noise(hidden_BTH, head.num_samples, rng), targets_BTMD)

    def head_loss(self, hidden_BTH: torch.Tensor, noise_BTNZ: torch.Tensor, targets_BTMD: torch.Tensor) -> torch.Tensor:
        """Mean energy score of the head's samples (one per noise vector) against the target samples."""
        samples_BTND = self.generative_head(hidden_BTH, noise_BTNZ)
        return energy_score(samples_BTND, targets_BTMD, self.model_cfg.head.beta).mean()

    def forward(self, tokens_BL: torch.Tensor, rng: SampleRNG, autoencoder: Autoencoder) -> torch.Tensor:
        """All stages in one process: scalar training loss."""
        return self.loss_from_hidden(self.backbone(self.embed(tokens_BL)), tokens_BL, rng, autoencoder)

    def predict_next_latents(self, tokens_BL: torch.Tensor, num_samples: int, rng: SampleRNG) -> torch.Tensor:
        """[B, T, n, D] teacher-forced head samples; entry t predicts chunk t+1 (the last: beyond the window)."""
        return self.generative_head.sample(self.hidden(tokens_BL), num_samples, rng)
