"""Diagnostics of a CALM run on held-out data: is it learning, or stuck at the marginal?

Energy loss and its two reference points, at every predicted chunk t+1 (t = 0..T-2), each the same
unbiased energy-score estimate (models/energy.py) with N model-side samples against the same M samples
y_m ~ q(z | true chunk) of the frozen autoencoder's posterior (N, M: model.head's num_samples and
num_target_samples):
- energy: the model's N head samples (the training objective, on held-out text);
- energy_marginal: N posterior samples, one each of N chunks drawn uniformly from the K-aligned
  chunks of the training split (data/chunk_pool.py): a model that has learned the latent cloud of
  the data but nothing about the context;
- energy_oracle: N independent samples of the true chunk's own posterior q(z | chunk): a model that
  knows the next chunk (what a perfect predictor of a deterministic continuation would score).
energy_position = (marginal - energy) / (marginal - oracle): 0 at the marginal, 1 at the oracle; its
standard error is the delta method with the 3 x 3 covariance of the three means (the three share
their targets, so the differences are much tighter than each mean).

real_chunk_fraction: of the S decoded head samples per Brier position, the fraction that are real
chunks (a K-token chunk found at a K-aligned position of the training split, data/chunk_pool.py);
heldout_real_chunk_fraction: the same for the true held-out chunks (its ceiling in practice).
"""
from __future__ import annotations

import math

import torch

from calm_train.models.energy import energy_score
from calm_train.models.rng import SampleRNG
from calm_train.train.moments import mean_and_covariance, moment_sums

ENERGY_COLUMNS = ("energy", "energy_oracle", "energy_marginal")


def decode_samples(autoencoder, latents_BPSD: torch.Tensor) -> torch.Tensor:
    """Argmax chunks [B, P, S, K], decoded one sample index at a time (bounds the [.., K, V] logits)."""
    return torch.stack([autoencoder.decode(latents_BPSD[:, :, s]) for s in range(latents_BPSD.shape[2])], 2)


@torch.no_grad()
def reference_samples(autoencoder, true_BTK: torch.Tensor, n: int, m: int, rng: SampleRNG,
                      pool=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(targets [B, T, m, D], oracle [B, T, n, D], marginal [B, T, n, D] or None without a pool) for chunks [B, T, K]:
    targets and oracle from the true chunk's posterior, marginal from the posteriors of n drawn training chunks."""
    b, t = true_BTK.shape[:2]
    targets_BTMD = autoencoder.posterior_samples(true_BTK, m, rng)
    oracle_BTND = autoencoder.posterior_samples(true_BTK, n, rng)
    if pool is None:
        return targets_BTMD, oracle_BTND, None
    drawn_BTNK = pool.draw(rng.uniform(t, n))
    marginal_BTND = autoencoder.posterior_samples(drawn_BTNK.flatten(1, 2), 1, rng).view(b, t, n, -1)
    return targets_BTMD, oracle_BTND, marginal_BTND


@torch.no_grad()
def diagnostic_sums(model, autoencoder, hidden_BTH: torch.Tensor, tokens_BL: torch.Tensor,
                    decoded_BPSK: torch.Tensor, rng: SampleRNG, pool=None) -> dict[str, torch.Tensor]:
    """Sums of the per-position energies (and outer products), real-chunk counts; marginal terms need `pool`."""
    head = model.model_cfg.head
    true_BTK = model.chunks(tokens_BL)[:, 1:]
    samples_BTND = model.generative_head.sample(hidden_BTH[:, :-1], head.num_samples, rng)
    references = reference_samples(autoencoder, true_BTK, head.num_samples, head.num_target_samples, rng, pool)
    targets_BTMD = references[0]
    energies = [energy_score(x, targets_BTMD, head.beta) for x in (samples_BTND, *references[1:]) if x is not None]
    sums = moment_sums("energy", torch.stack(energies, -1))
    if pool is not None:
        sums["real_chunks"] = pool.contains(decoded_BPSK).sum().double()
        sums["real_chunks_count"] = torch.tensor(float(decoded_BPSK[..., 0].numel()))
        sums["heldout_real_chunks"] = pool.contains(true_BTK).sum().double()
        sums["heldout_real_chunks_count"] = torch.tensor(float(true_BTK[..., 0].numel()))
    return sums


def energy_position(mean: torch.Tensor, covariance: torch.Tensor) -> tuple[float, float]:
    """(marginal - energy) / (marginal - oracle) and its delta-method standard error; means in ENERGY_COLUMNS order."""
    a, b, c = mean.tolist()
    gap = c - b
    value = (c - a) / gap
    grad = torch.tensor([-1 / gap, (c - a) / gap ** 2, (a - b) / gap ** 2], dtype=covariance.dtype)
    return value, math.sqrt(max(float(grad @ covariance @ grad), 0.0))


def finish_diagnostics(totals: dict) -> dict:
    """The diagnostic fields of an evaluation (none when the totals hold no CALM diagnostics)."""
    if "energy_count" not in totals:
        return {}
    mean, covariance = mean_and_covariance(totals, "energy")
    row = {}
    for i, name in enumerate(ENERGY_COLUMNS[:len(mean)]):     # no marginal without a chunk pool
        row[name] = float(mean[i])
        row[f"{name}_se"] = math.sqrt(max(float(covariance[i, i]), 0.0))
    if "real_chunks_count" in totals:
        row["energy_position"], row["energy_position_se"] = energy_position(mean, covariance)
        row["real_chunk_fraction"] = float(totals["real_chunks"] / totals["real_chunks_count"])
        row["heldout_real_chunk_fraction"] = float(totals["heldout_real_chunks"] / totals["heldout_real_chunks_count"])
    return row
