"""BrierLM estimators: unbiased for 2 P(y) - sum P^2 (tokens and n-grams); the AR form has lower variance."""
import itertools
import math

import pytest
import torch

from calm_train.models.brier import (BRIER_FLOOR, brier_exact, brier_ngram_sampled_with_probs, brier_two_sample,
                                     brier_u_statistic, brierlm, brierlm_standard_error, near_zero)

S = 100_000   # sample pairs per check; tolerances are 4 standard errors of the sample mean


def _within_ci(estimates: torch.Tensor, exact: float):
    mean, se = estimates.double().mean().item(), estimates.double().std().item() / math.sqrt(len(estimates))
    assert abs(mean - exact) <= 4 * se + 1e-6, (mean, exact, se)


def test_two_sample_estimate_is_unbiased_for_a_categorical():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    x1 = torch.multinomial(p, S, replacement=True, generator=g).unsqueeze(-1)
    x2 = torch.multinomial(p, S, replacement=True, generator=g).unsqueeze(-1)
    for y in range(6):
        y_S1 = torch.full((S, 1), y)
        exact = brier_exact(p, torch.tensor(y)).item()
        assert exact == pytest.approx(2 * p[y].item() - (p ** 2).sum().item())
        _within_ci(brier_two_sample(x1, x2, y_S1), exact)


def test_exact_brier_is_strictly_proper():
    """E_{y~q} Brier(p, y) = |q|^2 - |p - q|^2: largest at p = q."""
    g = torch.Generator().manual_seed(1)
    q = torch.softmax(torch.randn(8, generator=g), 0)
    expected = lambda p: (q * brier_exact(p.expand(8, 8), torch.arange(8))).sum().item()  # noqa: E731
    best = expected(q)
    assert best == pytest.approx((q ** 2).sum().item(), rel=1e-6)
    for _ in range(20):
        p = torch.softmax(torch.randn(8, generator=g), 0)
        assert expected(p) < best


# A small Markov chain over V = 4 tokens: the model's n-gram distribution after some context is
# P(x_1..x_n) = start(x_1) prod_i A[x_i, x_{i+1}].
START = torch.tensor([0.5, 0.2, 0.2, 0.1])
A = torch.tensor([[0.6, 0.2, 0.1, 0.1],
                  [0.1, 0.5, 0.3, 0.1],
                  [0.25, 0.25, 0.25, 0.25],
                  [0.7, 0.1, 0.1, 0.1]])


def _ngram_prob(x) -> float:
    p = START[x[0]].item()
    for a, b in zip(x, x[1:]):
        p *= A[a, b].item()
    return p


def _exact_ngram_brier(y, n) -> float:
    return 2 * _ngram_prob(y) - sum(_ngram_prob(x) ** 2 for x in itertools.product(range(4), repeat=n))


def _sample_ngrams(n, g) -> torch.Tensor:
    tokens = [torch.multinomial(START, S, replacement=True, generator=g)]
    for _ in range(n - 1):
        tokens.append(torch.multinomial(A[tokens[-1]], 1, generator=g).squeeze(-1))
    return torch.stack(tokens, dim=-1)   # [S, n]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ngram_estimators_are_unbiased_and_the_ar_form_has_lower_variance(n):
    g = torch.Generator().manual_seed(10 + n)
    x1, x2 = _sample_ngrams(n, g), _sample_ngrams(n, g)
    for y in [(0,) * n, (0, 1, 2, 0)[:n], (3, 0, 0, 1)[:n]]:
        exact = _exact_ngram_brier(y, n)
        y_Sn = torch.tensor(y).expand(S, n)
        two_sample = brier_two_sample(x1, x2, y_Sn)
        _within_ci(two_sample, exact)

        # AR form: the sampled (n-1)-prefixes and the model's exact last-token distribution after each
        last = lambda x: START.expand(S, 4) if n == 1 else A[x[:, -2]]  # noqa: E731
        reduced = brier_ngram_sampled_with_probs(x1[:, :-1], last(x1), x2[:, :-1], last(x2), y_Sn)
        _within_ci(reduced, exact)
        if n == 1:   # empty prefixes: the estimate is the exact Brier score
            torch.testing.assert_close(reduced, torch.full((S,), exact), rtol=1e-5, atol=1e-6)
        else:        # Rao-Blackwell: strictly less variance here (measured ratios 0.09-0.56; bound 0.8)
            assert reduced.var() < 0.8 * two_sample.var(), (y, reduced.var().item(), two_sample.var().item())


def test_ngram_tuples_must_match_entirely():
    x1 = torch.tensor([[1, 2, 3], [1, 2, 3]])
    x2 = torch.tensor([[1, 2, 4], [1, 2, 3]])
    y = torch.tensor([[1, 2, 3], [0, 2, 3]])
    assert brier_two_sample(x1, x2, y).tolist() == [1.0, -1.0]


def test_brierlm_is_100_times_the_geometric_mean_with_a_floor():
    assert brierlm([0.5, 0.5, 0.5, 0.5]) == pytest.approx(50.0)
    assert brierlm([0.8, 0.4, 0.2, 0.1]) == pytest.approx(100 * (0.8 * 0.4 * 0.2 * 0.1) ** 0.25)
    assert brierlm([0.4, 0.1, -0.2, 0.05]) == pytest.approx(100 * (0.4 * 0.1 * BRIER_FLOOR * 0.05) ** 0.25)
    with pytest.raises(ValueError):
        brierlm([])


def test_u_statistic_is_unbiased_with_far_less_variance_than_two_samples():
    """A categorical P over 6 outcomes: the U-statistic over S samples estimates 2 P(y) - sum P^2 without bias,
    equals the two-sample estimate at S = 2, and its variance at S = 16 is below a quarter of S = 2's
    (its leading term falls as 1/S; measured here: 0.06-0.08 of the two-sample variance)."""
    g = torch.Generator().manual_seed(3)
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    rows = 40_000
    x_RS1 = torch.multinomial(p, rows * 16, replacement=True, generator=g).view(rows, 16, 1)
    for y in (0, 3, 5):
        y_R1 = torch.full((rows, 1), y)
        exact = brier_exact(p, torch.tensor(y)).item()
        two = brier_u_statistic(x_RS1[:, :2], y_R1)
        torch.testing.assert_close(two, brier_two_sample(x_RS1[:, 0], x_RS1[:, 1], y_R1))
        u16 = brier_u_statistic(x_RS1, y_R1)
        _within_ci(two, exact)
        _within_ci(u16, exact)
        assert u16.var() < 0.25 * two.var(), (y, u16.var().item(), two.var().item())
    with pytest.raises(ValueError):
        brier_u_statistic(x_RS1[:, :1], torch.zeros(rows, 1, dtype=torch.long))


def test_u_statistic_counts_every_equal_pair_of_ngrams():
    """S = 4 bigram samples, two equal pairs among the 6, one sample hits y: 2 * 1/4 - 2/6."""
    x = torch.tensor([[[1, 2], [1, 2], [3, 4], [3, 4]]])
    assert brier_u_statistic(x, torch.tensor([[1, 3]])).item() == pytest.approx(-2 / 6)
    assert brier_u_statistic(x, torch.tensor([[3, 4]])).item() == pytest.approx(2 * 2 / 4 - 2 / 6)
    x = torch.tensor([[[1, 2], [1, 5], [7, 2], [0, 0]]])      # no equal pair, one hit
    assert brier_u_statistic(x, torch.tensor([[7, 2]])).item() == pytest.approx(0.5)


def test_brierlm_standard_error_matches_the_spread_of_brierlm_over_repeated_evaluations():
    """Per-position estimates (4 correlated Brier-n); the delta-method SE of BrierLM from one evaluation's
    covariance agrees with the standard deviation of BrierLM over 400 independent evaluations."""
    g = torch.Generator().manual_seed(5)
    positions, repeats = 2000, 400
    base = torch.rand(repeats, positions, generator=g)
    est = torch.stack([0.5 + 0.6 * (base - 0.5), 0.3 + 0.5 * (base - 0.5) + 0.1 * torch.randn(repeats, positions, generator=g),
                       0.2 + 0.2 * torch.randn(repeats, positions, generator=g),
                       0.1 + 0.3 * (base - 0.5)], -1).double()                   # [repeats, positions, 4]
    values = torch.tensor([brierlm(e.mean(0).tolist()) for e in est])
    e = est[0]
    covariance = torch.cov(e.T) / positions
    se = brierlm_standard_error(e.mean(0).tolist(), covariance.tolist())
    assert se == pytest.approx(values.std().item(), rel=0.15)
    # independent columns would give a different (wrong) answer: the covariance terms matter here
    assert brierlm_standard_error(e.mean(0).tolist(), torch.diag(covariance.diagonal()).tolist()) < 0.8 * se


def test_near_zero_names_the_n_below_two_standard_errors():
    assert near_zero([0.2, 0.01, 0.003, -0.001], [0.01, 0.004, 0.002, 0.001]) == [3, 4]
    assert near_zero([0.2, 0.1], [0.01, 0.01]) == []
    assert near_zero([0.3, 0.0, 0.0, 0.0], [0.01, 0.0, 0.0, 0.0]) == [2, 3, 4]     # exactly 0, no spread: near 0 too
