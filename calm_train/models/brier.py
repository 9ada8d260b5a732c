"""BrierLM: a likelihood-free, strictly proper language-model metric (CALM, Section 4).

For a predictive distribution P over outcomes and the observed outcome y, the Brier score
(here in its "higher is better" form) is

    Brier(P, y) = 2 P(y) - sum_x P(x)^2.

Without access to P, two independent samples x1, x2 ~ P give the unbiased estimate

    1{x1 = y} + 1{x2 = y} - 1{x1 = x2},

since E 1{x_i = y} = P(y) and E 1{x1 = x2} = sum_x P(x)^2.  Brier-n applies it to the n-gram
that follows a position (outcomes are n-token tuples), and

    BrierLM = 100 * (Brier-1 * Brier-2 * Brier-3 * Brier-4)^(1/4).

Variance-reduced form for models with exact next-token probabilities (the AR baseline): sample
two (n-1)-token prefixes a, b ~ P (ancestral sampling) and take the model's exact last-token
distributions q_a = P(. | a), q_b = P(. | b).  Replacing each indicator of the two-sample estimate
by its expectation over the last token given the prefixes gives

    1{a = y_<n} q_a(y_n) + 1{b = y_<n} q_b(y_n) - 1{a = b} sum_v q_a(v) q_b(v).

Unbiased: E[1{a = y_<n} q_a(y_n)] = P(y_<n) P(y_n | y_<n) = P(y), and
E[1{a = b} <q_a, q_b>] = sum_a P(a)^2 sum_v q_a(v)^2 = sum_x P(x)^2.  It is the conditional
expectation of the two-sample estimate given (a, b), so by Rao-Blackwell its variance is never
larger; for n = 1 (empty prefixes) it equals the exact Brier score.

Lower-variance form for sampling-only models (CALM): with S >= 2 independent samples x_1..x_S ~ P,
the U-statistic

    2 mean_i 1{x_i = y}  -  mean_{i<j} 1{x_i = x_j}

is unbiased for the same quantity (each term is, by linearity) and is the average of the two-sample
estimate over all S(S-1)/2 pairs, so its variance is never larger; S = 2 is the two-sample estimate.

Standard errors: the estimates of one position are averaged over positions; the standard error of
each Brier-n is the sample standard deviation over positions / sqrt(positions) (positions are
treated as independent draws).  BrierLM's standard error is the delta method applied to the
geometric mean, with the 4 x 4 covariance of the Brier-n means (the four are correlated: a 4-gram
hit is also a 1-gram hit):  Var BrierLM ~ sum_{n,m} g_n g_m Cov(b_n, b_m), g_n = BrierLM / (4 b_n).
It is a first-order approximation that fails when a Brier-n is within a few standard errors of 0
(the geometric mean is not smooth there): `near_zero` names those n.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

BRIER_FLOOR = 1e-8   # each Brier-n is clamped at this floor before the geometric mean (a mean can be <= 0)


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whole n-gram equality over the last dimension (True for empty n-grams)."""
    return (a == b).all(dim=-1)


def brier_two_sample(x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise 1{x1=y} + 1{x2=y} - 1{x1=x2} for n-gram tuples [..., n]; float [...]."""
    return _same(x1, y).float() + _same(x2, y).float() - _same(x1, x2).float()


def brier_u_statistic(samples_SN: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise 2 mean_i 1{x_i=y} - mean_{i<j} 1{x_i=x_j} over S >= 2 samples.

    samples_SN: [..., S, n] sampled n-grams; y: [..., n] observed; float [...].
    """
    s = samples_SN.shape[-2]
    if s < 2:
        raise ValueError(f"brier_u_statistic needs >= 2 samples per position, got S={s}")
    hits = _same(samples_SN, y.unsqueeze(-2)).float().mean(-1)
    equal_pairs = _same(samples_SN.unsqueeze(-2), samples_SN.unsqueeze(-3)).float().sum((-1, -2)) - s
    return 2 * hits - equal_pairs / (s * (s - 1))


def brier_exact(probs_V: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """2 p(y) - sum_v p(v)^2 for probabilities [..., V] and outcomes [...]."""
    p_y = probs_V.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return 2 * p_y - probs_V.pow(2).sum(-1)


def brier_ngram_sampled_with_probs(prefix1: torch.Tensor, probs1_V: torch.Tensor,
                                   prefix2: torch.Tensor, probs2_V: torch.Tensor,
                                   y: torch.Tensor) -> torch.Tensor:
    """Rao-Blackwellised Brier-n estimate [...] (see the module docstring).

    prefix1, prefix2: [..., n-1] sampled prefixes (n-1 may be 0); probs1_V, probs2_V: [..., V] the
    model's next-token distribution after each prefix; y: [..., n] the observed n-gram.
    """
    last = y[..., -1:]
    hit1 = _same(prefix1, y[..., :-1]).float() * probs1_V.gather(-1, last).squeeze(-1)
    hit2 = _same(prefix2, y[..., :-1]).float() * probs2_V.gather(-1, last).squeeze(-1)
    collision = _same(prefix1, prefix2).float() * (probs1_V * probs2_V).sum(-1)
    return hit1 + hit2 - collision


def brierlm(brier_n: Sequence[float]) -> float:
    """100 x geometric mean of Brier-1..4 (each clamped at BRIER_FLOOR)."""
    if len(brier_n) == 0:
        raise ValueError("brierlm needs the Brier-n values (n = 1..4), got none")
    logs = [math.log(max(float(b), BRIER_FLOOR)) for b in brier_n]
    return 100 * math.exp(sum(logs) / len(logs))


def brierlm_standard_error(brier_n: Sequence[float], covariance: Sequence[Sequence[float]]) -> float:
    """Delta-method standard error of brierlm(brier_n) given the covariance of the Brier-n means.

    A Brier-n at or below BRIER_FLOOR contributes no gradient (BrierLM is flat there).
    """
    value = brierlm(brier_n)
    grad = [value / (len(brier_n) * b) if b > BRIER_FLOOR else 0.0 for b in map(float, brier_n)]
    var = sum(grad[i] * grad[j] * float(covariance[i][j]) for i in range(len(grad)) for j in range(len(grad)))
    return math.sqrt(max(var, 0.0))


def near_zero(means: Sequence[float], standard_errors: Sequence[float]) -> list[int]:
    """The n (1-based) whose Brier-n mean is at most two standard errors: not distinguishable from 0.  A mean of
    exactly 0 with a standard error of 0 (no sampled n-gram ever matched) is listed too: `<=`, not `<`."""
    return [n for n, (m, se) in enumerate(zip(means, standard_errors), 1) if m <= 2 * se]
