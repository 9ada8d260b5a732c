"""Temperature sampling with a black-box sampler (CALM, Section 5).

CALM can draw samples x ~ p but cannot evaluate p, so p^(1/T) / Z is reached by rejection.

Exact algorithm, any T in (0, 1].  Write 1/T = n + alpha with n = floor(1/T), alpha in [0, 1).
  Stage 1: draw n samples; if they are not all identical, restart.  A value x survives with
           probability p(x)^n.
  Stage 2 (alpha > 0): a Bernoulli factory for p(x)^alpha using only fresh draws as coins with
           heads probability p(x): for i = 1, 2, ...: draw x'; if x' == x accept x; otherwise
           restart stage 1 with probability alpha / i, else continue with i + 1.
  Derivation of stage 2: it accepts with probability
      sum_{k>=0} p (1-p)^k prod_{i=1}^k (1 - alpha/i)
    = p sum_k (1-p)^k (1-alpha)(2-alpha)...(k-alpha)/k!
    = p (1 - (1-p))^(alpha-1)      (binomial series of (1-u)^(alpha-1) at u = 1-p)
    = p^alpha.
  So one round outputs x with probability p(x)^n p(x)^alpha = p(x)^(1/T), and the accepted
  sample is distributed as p^(1/T) / Z.  T = 1 is a plain draw.

Approximate batch algorithm, T = 1/n.  Draw a pool of N samples; a value x seen c_x times is
chosen with weight C(c_x, n), the number of n-subsets of the pool that are all x (each such
subset is one stage-1 success).  E C(c_x, n) = C(N, n) p(x)^n, so the normalised weights converge
to p^n / Z as N grows.  When no value occurs n times the weights fall back to C(c_x, n-1), then
n-2, ... (m = 1 is plain sampling from the pool).

Samples are compared by value: tensors by shape and contents, tuples/lists elementwise, other
objects by their own hash and equality.
"""
from __future__ import annotations

import math
from typing import Callable, Hashable, Sequence

import torch


def sample_key(sample) -> Hashable:
    if isinstance(sample, torch.Tensor):
        return tuple(sample.shape), tuple(sample.reshape(-1).tolist())
    if isinstance(sample, (tuple, list)):
        return tuple(sample_key(s) for s in sample)
    return sample


def _uniform(generator: torch.Generator | None) -> float:
    return torch.rand((), generator=generator).item()


def split_inverse_temperature(temperature: float) -> tuple[int, float]:
    """1/T = n + alpha with integer n >= 1 and alpha in [0, 1) (alpha snapped to 0 within 1e-9)."""
    if not 0 < temperature <= 1:
        raise ValueError(f"temperature {temperature} is outside (0, 1]: use 0 for greedy decoding "
                         "and T <= 1 for sharpening")
    inverse = 1.0 / temperature
    n = math.floor(inverse + 1e-9)
    alpha = inverse - n
    return n, (0.0 if alpha < 1e-9 else alpha)


def exact_temperature_sample(draw: Callable[[], object], temperature: float,
                             generator: torch.Generator | None = None, max_draws: int | None = None):
    """One sample distributed as p^(1/T) / Z, using only draws from p (module docstring)."""
    n, alpha = split_inverse_temperature(temperature)
    used = 0

    def fresh():
        nonlocal used
        if max_draws is not None and used >= max_draws:
            raise RuntimeError(f"exact temperature sampling at T={temperature} accepted nothing in {max_draws} "
                               "draws: the distribution is too spread out for this temperature; raise T, "
                               "raise max_draws or use approximate_temperature_sample")
        used += 1
        return draw()

    while True:
        candidate = fresh()
        key = sample_key(candidate)
        if any(sample_key(fresh()) != key for _ in range(n - 1)):
            continue
        if alpha == 0 or _bernoulli_power(lambda: sample_key(fresh()) == key, alpha, generator):
            return candidate


def _bernoulli_power(coin: Callable[[], bool], alpha: float, generator: torch.Generator | None) -> bool:
    """True with probability p^alpha given a coin with unknown heads probability p."""
    i = 1
    while True:
        if coin():
            return True
        if _uniform(generator) < alpha / i:
            return False
        i += 1


def approximate_temperature_weights(pool: Sequence, n: int) -> tuple[list, torch.Tensor]:
    """(distinct values of the pool, their selection probabilities) for T = 1/n."""
    if n < 1 or not pool:
        raise ValueError(f"approximate temperature sampling needs n >= 1 and a non-empty pool (n={n}, "
                         f"pool of {len(pool)})")
    values, counts, index = [], [], {}
    for sample in pool:
        key = sample_key(sample)
        if key not in index:
            index[key] = len(values)
            values.append(sample)
            counts.append(0)
        counts[index[key]] += 1
    for m in range(n, 0, -1):   # m = 1 always has weight: every count is >= 1
        weights = [math.comb(c, m) for c in counts]
        if any(weights):
            break
    total = sum(weights)
    return values, torch.tensor([w / total for w in weights], dtype=torch.float64)


def approximate_temperature_sample(pool: Sequence, n: int, generator: torch.Generator | None = None):
    """One value of the pool chosen with weight C(count, n) (falling back to n-1, ...); ~ p^n / Z for large pools."""
    values, probs = approximate_temperature_weights(pool, n)
    return values[torch.multinomial(probs, 1, generator=generator).item()]
