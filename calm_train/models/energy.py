"""The energy-based generative head and the energy score (CALM, Section 3).

The head maps a backbone hidden state h and a noise vector eps ~ U[-0.5, 0.5]^noise_size to one
sample of the next latent vector: noise and hidden are embedded (Linear + LayerNorm),

    s_0 = LN(W_eps eps)                      (the reference)
    s_0 = LN(W_eps eps) + LN(W_h h)          (model.head.hidden_in_stream=true)

the stream s is refined by residual MLP blocks conditioned on the hidden embedding, and a final
LayerNorm -> Linear -> SiLU -> Linear maps it to the latent (last layer zero-initialised).
Parameter names mirror the reference release's `MLPGenerator` checkpoint keys; both options add none.

Initialisation (`model.head.init`): `reference` draws every Linear weight from N(0, model.init_std^2),
`fan_in` from N(0, 1/fan_in).  With the reference's std 0.02 a narrow head (width 128) starts with
blocks whose update is ~2e-6 of their input (fan_in: ~0.06): each Linear scales by 0.02 sqrt(fan_in)
~ 0.2-0.3 and the gate multiplies two such signals.  So h reaches the output only through nearly
dead blocks while the noise embedding reaches it directly: the head learns the marginal cloud of latents at once and the
dependence on h very slowly (benchmarks/learning_ladder.py measures it).

The loss is the energy score of N model samples x against M samples y of the frozen
autoencoder's posterior, per position:

    L = 2/(N M) sum_{n,m} ||x_n - y_m||^beta  -  1/(N (N-1)) sum_{n != k} ||x_n - x_k||^beta

(the negative of the paper's score, so lower is better).  It is an unbiased estimate of
2 E||X - Y||^beta - E||X - X'||^beta, strictly proper for beta in (0, 2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm_train.config import EnergyHeadArch
from calm_train.models.rng import SampleRNG

LN_EPS = 1e-6
SQRT_FLOOR = 1e-12   # added to squared distances: keeps d/dx ||x - y||^beta finite where x == y


class MLPBlock(nn.Module):
    """x + down_proj(SiLU(gate) * up), [gate, up] = MLP(concat(LayerNorm(x), y))."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=LN_EPS)
        self.linears = nn.Sequential(
            nn.Linear(2 * channels, channels), nn.SiLU(),
            nn.Linear(channels, channels), nn.SiLU(),
            nn.Linear(channels, 2 * channels))
        self.down_proj = nn.Linear(channels, channels)

    def forward(self, x_BTNH: torch.Tensor, y_BT1H: torch.Tensor) -> torch.Tensor:
        # Linear(concat(a, y)) = W_a a + W_y y + b; the y half is computed once per position, not N times.
        first = self.linears[0]
        w_x, w_y = first.weight.split(x_BTNH.shape[-1], dim=1)
        h = F.linear(self.in_ln(x_BTNH), w_x, first.bias) + F.linear(y_BT1H, w_y)
        gate, up = self.linears[1:](h).chunk(2, dim=-1)
        return x_BTNH + self.down_proj(F.silu(gate) * up)


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=LN_EPS)
        self.linears = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linears(self.in_ln(x))


class EnergyHead(nn.Module):
    """Linear weights ~ N(0, init_std) (arch.init reference) or N(0, 1/fan_in) (fan_in), biases 0, last layer 0."""

    def __init__(self, hidden_size: int, latent_size: int, arch: EnergyHeadArch, init_std: float = 0.02):
        super().__init__()
        self.noise_size, self.hidden_in_stream = arch.noise_size, arch.hidden_in_stream
        self.noise_embd = nn.Linear(arch.noise_size, hidden_size)
        self.hidden_embd = nn.Linear(hidden_size, hidden_size)
        self.norm_hidden = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.norm_noise = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.mlp_blocks = nn.ModuleList(MLPBlock(hidden_size) for _ in range(arch.num_blocks))
        self.final_layer = FinalLayer(hidden_size, latent_size)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                std = module.in_features ** -0.5 if arch.init == "fan_in" else init_std
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.final_layer.linears[2].weight)

    def forward(self, hidden_BTH: torch.Tensor, noise_BTNZ: torch.Tensor) -> torch.Tensor:
        """[B, T, N, D]: one latent sample per noise vector."""
        y_BT1H = self.norm_hidden(self.hidden_embd(hidden_BTH)).unsqueeze(-2)
        x_BTNH = self.norm_noise(self.noise_embd(noise_BTNZ))
        if self.hidden_in_stream:
            x_BTNH = x_BTNH + y_BT1H
        for block in self.mlp_blocks:
            x_BTNH = block(x_BTNH, y_BT1H)
        return self.final_layer(x_BTNH)

    def sample(self, hidden_BTH: torch.Tensor, num_samples: int, rng: SampleRNG) -> torch.Tensor:
        """[B, T, N, D] with noise ~ U[-0.5, 0.5]^noise_size drawn from the per-sample generators."""
        return self(hidden_BTH, self.noise(hidden_BTH, num_samples, rng))

    def noise(self, hidden_BTH: torch.Tensor, num_samples: int, rng: SampleRNG) -> torch.Tensor:
        """[B, T, N, noise_size] ~ U[-0.5, 0.5], row b from generator b, in the hidden states' dtype."""
        B, T, _ = hidden_BTH.shape
        if len(rng) != B:
            raise ValueError(f"EnergyHead.noise: the SampleRNG has {len(rng)} rows for a batch of {B}; "
                             "pass rng.narrow(...) matching the hidden states' rows")
        return rng.uniform(T, num_samples, self.noise_size, dtype=hidden_BTH.dtype) - 0.5


def pairwise_distance(a_PND: torch.Tensor, b_PMD: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """||a_n - b_m||^beta as [..., N, M], via ||a||^2 + ||b||^2 - 2 a.b: no [..., N, M, D] tensor and no
    copy of b (the squared norms are reductions)."""
    sq_PNM = torch.linalg.vector_norm(a_PND, dim=-1).square()[..., :, None] \
        + torch.linalg.vector_norm(b_PMD, dim=-1).square()[..., None, :] - 2 * a_PND @ b_PMD.transpose(-1, -2)
    return (sq_PNM.clamp_min(0) + SQRT_FLOOR) ** (beta / 2)


def energy_score(samples_BTND: torch.Tensor, targets_BTMD: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Per-position energy loss [B, T] (lower is better); computed in float32.

    The model samples are centred on their (detached) mean before their pairwise distances: the
    distances do not change, and the expansion loses less precision to cancellation between
    nearby samples.  Peak memory beyond the inputs is a few [B, T, N, M] tensors.
    """
    N = samples_BTND.shape[-2]
    if N < 2:
        raise ValueError(f"energy_score needs >= 2 model samples per position, got N={N}: "
                         "raise model.head.num_samples")
    x, y = samples_BTND.float(), targets_BTMD.float()
    fit_BT = pairwise_distance(x, y, beta).mean(dim=(-2, -1))
    x = x - x.detach().mean(dim=-2, keepdim=True)
    off_diagonal_NN = 1 - torch.eye(N, device=x.device)
    spread_BT = (pairwise_distance(x, x, beta) * off_diagonal_NN).sum(dim=(-2, -1)) / (N * (N - 1))
    return 2 * fit_BT - spread_BT
