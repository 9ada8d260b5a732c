"""CALM's Brier-n for every K: sampled chunks are rolled out (KV-cached, the model's own samples fed back)
until they hold 4 tokens, so Brier-n scores n-token continuations drawn from the model.

Checked on models whose distribution is known: a test-local CALM-shaped model that is a first-order Markov
chain over tokens (its head turns uniform noise into K tokens by inverse CDF, its "latent" is their one-hot
code, the decoder an argmax): its exact Brier-n, 2 P(y | a) - sum_x P(x | a)^2 with a the token before the
boundary, is known at every position.  A deterministic chain gives every estimate exactly; a random chain
gives means within their standard errors.  For K >= 4 nothing is rolled out: the estimates are those of the
chunks' first tokens, with no further random draws (the numbers of earlier versions).
"""
import math

import pytest
import torch

from calm_train.models.rng import SampleRNG
from calm_train.train.evaluate import MAX_N, boundaries, calm_brier_estimates, calm_brier_samples, next_ngrams
from calm_train.train.moments import mean_and_covariance, moment_sums

V = 5


class MarkovHead(torch.nn.Module):
    """Latent of K tokens drawn from the chain Q, starting after the token that `hidden` one-hot encodes."""

    def __init__(self, q: torch.Tensor, k: int):
        super().__init__()
        self.q, self.k, self.noise_size = q, k, k

    def forward(self, hidden_BTH, noise_BTNZ):
        state = hidden_BTH.argmax(-1)[..., None].expand(noise_BTNZ.shape[:-1])       # [B, T, N]
        codes = []
        for j in range(self.k):
            cdf = self.q[state].cumsum(-1)
            state = torch.searchsorted(cdf, (noise_BTNZ[..., j] + 0.5).unsqueeze(-1)).squeeze(-1).clamp_max(V - 1)
            codes.append(torch.nn.functional.one_hot(state, V).double())
        return torch.cat(codes, -1)

    def sample(self, hidden_BTH, num_samples, rng):
        return self(hidden_BTH, rng.uniform(hidden_BTH.shape[1], num_samples, self.noise_size) - 0.5)


class MarkovCALM(torch.nn.Module):
    """hidden_t = one-hot of the last token of chunk t: the chain's state; the cache only counts positions."""
    sequence_multiple = 1

    def __init__(self, q, k):
        super().__init__()
        self.patch_size, self.generative_head = k, MarkovHead(q, k)

    def hidden(self, tokens_BL, cache=None):
        if cache is not None:
            cache.length += tokens_BL.shape[1] // self.patch_size
        return torch.nn.functional.one_hot(tokens_BL[:, self.patch_size - 1::self.patch_size], V).double()


class OneHotDecoder:
    def __init__(self, k):
        self.patch_size = k

    def decode(self, z_D):
        return z_D.unflatten(-1, (self.patch_size, V)).argmax(-1)


def _chain(q, b, length, generator):
    tokens = [torch.randint(V, (b,), generator=generator)]
    for _ in range(length - 1):
        tokens.append(torch.multinomial(q[tokens[-1]], 1, generator=generator)[:, 0])
    return torch.stack(tokens, 1)


def _exact(q, tokens_BL, k):
    """[B, P, 4] exact Brier-n at every boundary: 2 P(y | a) - sum_x P(x | a)^2."""
    idx = boundaries(tokens_BL.shape[1], k)
    a = tokens_BL[:, idx - 1]
    y = next_ngrams(tokens_BL, k)
    p_y, collision = torch.ones(a.shape, dtype=torch.float64), torch.eye(V, dtype=torch.float64)[a]
    state, out = a, []
    for n in range(MAX_N):
        p_y = p_y * q[state, y[..., n]]
        state = y[..., n]
        collision = collision @ (q * q)
        out.append(2 * p_y - collision.sum(-1))
    return torch.stack(out, -1)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_deterministic_chain_scores_exactly_for_k_below_4(k):
    q = torch.eye(V, dtype=torch.float64).roll(1, 1)            # v -> v + 1 mod V
    generator = torch.Generator().manual_seed(k)
    tokens = _chain(q, 6, 24, generator)
    tokens[0, 10:] = (tokens[0, 10:] + 2) % V                    # a jump: some continuations are wrong
    _, _, ngrams = calm_brier_samples(MarkovCALM(q, k), OneHotDecoder(k), tokens, SampleRNG(torch.arange(6)), 3)
    estimates = calm_brier_estimates(ngrams, next_ngrams(tokens, k))
    assert torch.equal(estimates.double(), _exact(q, tokens, k))
    assert (estimates == -1).any() and (estimates[..., MAX_N - 1] == 1).any()   # hits beyond K exist


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_random_chain_scores_its_exact_brier_within_standard_errors(k):
    generator = torch.Generator().manual_seed(10 + k)
    q = torch.rand(V, V, generator=generator, dtype=torch.float64) ** 3
    q /= q.sum(-1, keepdim=True)
    tokens = _chain(q, 96, 36, generator)
    _, _, ngrams = calm_brier_samples(MarkovCALM(q, k), OneHotDecoder(k), tokens, SampleRNG(torch.arange(96)), 6)
    estimates = calm_brier_estimates(ngrams, next_ngrams(tokens, k))
    mean, covariance = mean_and_covariance(moment_sums("b", estimates - _exact(q, tokens, k)), "b")
    z = mean / covariance.diagonal().sqrt()
    assert (z.abs() < 3).all(), z
    brier = estimates.double().mean((0, 1))
    assert len(set(brier.tolist())) == MAX_N and brier[MAX_N - 1] > 0.01   # four different values, not artefacts


def test_k4_draws_nothing_beyond_the_head_samples():
    q = torch.full((V, V), 1 / V, dtype=torch.float64)
    tokens = _chain(q, 4, 16, torch.Generator().manual_seed(0))
    rng, fresh = SampleRNG(torch.arange(4)), SampleRNG(torch.arange(4))
    _, decoded, ngrams = calm_brier_samples(MarkovCALM(q, 4), OneHotDecoder(4), tokens, rng, 2)
    assert torch.equal(ngrams, decoded[..., :MAX_N])
    fresh.uniform(4, 2, 4)                                       # the head samples' draw [B, T, S, Z]
    assert torch.equal(rng.uniform(3), fresh.uniform(3))        # and no other draw came after it
    assert math.isfinite(float(calm_brier_estimates(ngrams, next_ngrams(tokens, 4)).sum()))
