"""CALM's held-out diagnostics on a toy with exact answers: the oracle and marginal energy references.

A real (untrained) autoencoder with a 1-dimensional latent: every chunk's posterior is a Gaussian
N(mu_c, s_c^2) we can read off its encoder, and in one dimension E|X - Y| has a closed form, so the
energy score (beta = 1) of the two references is exact:
  oracle   (X ~ the true chunk's posterior):   2 s_y / sqrt(pi)
  marginal (X ~ sum_c w_c N(mu_c, s_c^2), w_c the chunk's share of the pool's positions):
           2 sum_c w_c f(mu_c - mu_y, sqrt(s_c^2 + s_y^2)) - sum_{c,c'} w_c w_c' f(mu_c - mu_c', sqrt(s_c^2 + s_c'^2))
with f(d, sigma) = E|N(d, sigma^2)| = sigma sqrt(2/pi) exp(-d^2 / 2 sigma^2) + d (1 - 2 Phi(-d / sigma)).
"""
import math

import pytest
import torch

from calm_train.config import AutoencoderArch
from calm_train.data.chunk_pool import ChunkPool
from calm_train.models.autoencoder import Autoencoder
from calm_train.models.energy import energy_score
from calm_train.models.rng import SampleRNG
from calm_train.train.calm_diagnostics import energy_position, reference_samples
from calm_train.train.moments import mean_and_covariance, moment_sums

CHUNKS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 1], [2, 2, 0, 3]])
COUNTS = (5, 3, 2)


def _abs_normal(d: float, sigma: float) -> float:
    phi = 0.5 * (1 + math.erf(-d / sigma / math.sqrt(2)))
    return sigma * math.sqrt(2 / math.pi) * math.exp(-d * d / (2 * sigma * sigma)) + d * (1 - 2 * phi)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    arch = AutoencoderArch(hidden_size=16, intermediate_size=32, latent_size=1)
    ae = Autoencoder(arch, vocab_size=8, patch_size=4).eval()
    with torch.no_grad():
        ae.encoder.hidden_to_latent.weight[0] *= 60          # spread the means over a few posterior widths
    mean, log_std = ae.encode(CHUNKS[None])
    mu, s = mean[0, :, 0].tolist(), log_std[0, :, 0].exp().tolist()
    assert max(mu) - min(mu) > 2 * max(s)                  # the three posteriors are distinct
    pool = ChunkPool(torch.cat([CHUNKS[i:i + 1].expand(c, 4) for i, c in enumerate(COUNTS)]), vocab_size=8)
    return ae, pool, mu, s


def test_oracle_and_marginal_energies_match_their_closed_forms(toy):
    ae, pool, mu, s = toy
    w = [c / sum(COUNTS) for c in COUNTS]
    rows = 3000
    true_BTK = CHUNKS[torch.arange(rows) % 3][:, None]                    # [B, 1, K]: each chunk 1000 times
    rng = SampleRNG(torch.arange(rows))
    targets, oracle, marginal = reference_samples(ae, true_BTK, n=8, m=100, rng=rng, pool=pool)
    energies = torch.stack([energy_score(oracle, targets), energy_score(marginal, targets)], -1)
    for y in range(3):
        mean, cov = mean_and_covariance(moment_sums("e", energies[y::3]), "e")
        se = cov.diagonal().sqrt()
        exact_oracle = 2 * s[y] / math.sqrt(math.pi)
        cross = sum(w[c] * _abs_normal(mu[c] - mu[y], math.hypot(s[c], s[y])) for c in range(3))
        spread = sum(w[c] * w[d] * _abs_normal(mu[c] - mu[d], math.hypot(s[c], s[d])) for c in range(3) for d in range(3))
        exact_marginal = 2 * cross - spread
        assert abs(mean[0].item() - exact_oracle) < 4 * se[0].item(), (y, mean[0].item(), exact_oracle, se[0].item())
        assert abs(mean[1].item() - exact_marginal) < 4 * se[1].item(), (y, mean[1].item(), exact_marginal)
        assert exact_marginal > exact_oracle + 10 * se[1].item()


def test_without_a_pool_only_the_oracle_reference_is_drawn(toy):
    ae, _, _, _ = toy
    targets, oracle, marginal = reference_samples(ae, CHUNKS[None], n=4, m=10, rng=SampleRNG(torch.tensor([7])))
    assert targets.shape == (1, 3, 10, 1) and oracle.shape == (1, 3, 4, 1) and marginal is None


def test_energy_position_is_0_at_the_marginal_1_at_the_oracle_with_a_delta_method_error():
    covariance = torch.diag(torch.tensor([0.04, 0.01, 0.09], dtype=torch.float64))
    assert energy_position(torch.tensor([9.0, 1.0, 9.0], dtype=torch.float64), covariance)[0] == pytest.approx(0)
    assert energy_position(torch.tensor([1.0, 1.0, 9.0], dtype=torch.float64), covariance)[0] == pytest.approx(1)
    value, se = energy_position(torch.tensor([5.0, 1.0, 9.0], dtype=torch.float64), covariance)
    # f = (c - a) / (c - b): grad (-1/8, 4/64, 4/64)
    assert value == pytest.approx(0.5)
    assert se == pytest.approx(math.sqrt(0.04 / 64 + 0.01 * (4 / 64) ** 2 + 0.09 * (4 / 64) ** 2))
