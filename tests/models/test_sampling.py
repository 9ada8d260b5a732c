"""Temperature sampling from a black-box sampler: exact rejection algorithm and approximate batch algorithm."""
import pytest
import torch

from calm_train.models.sampling import (approximate_temperature_sample, approximate_temperature_weights,
                                        exact_temperature_sample, split_inverse_temperature)

P = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05], dtype=torch.float64)
SIGNIFICANCE = 1e-3   # chi-square tests reject below this p-value (fixed seeds: the outcome is deterministic)


def tempered(p: torch.Tensor, inverse_temperature: float) -> torch.Tensor:
    q = p ** inverse_temperature
    return q / q.sum()


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test; bins expected < 5 are merged into one."""
    expected = probs * counts.sum()
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)])
        expected = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = len(counts) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


def black_box(seed: int, as_tensor: bool = False, size: int = 400_000):
    """A sampler we can call but not evaluate: a stream of categorical draws from P."""
    stream = iter(torch.multinomial(P, size, replacement=True, generator=torch.Generator().manual_seed(seed)).tolist())
    if as_tensor:
        return lambda: torch.tensor([next(stream), 7])
    return lambda: next(stream)


def test_split_inverse_temperature():
    assert split_inverse_temperature(1.0) == (1, 0.0)
    assert split_inverse_temperature(0.5) == (2, 0.0)
    assert split_inverse_temperature(1 / 3) == (3, 0.0)
    n, alpha = split_inverse_temperature(0.8)
    assert n == 1 and alpha == pytest.approx(0.25)
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="greedy"):
            split_inverse_temperature(bad)


@pytest.mark.parametrize("temperature,as_tensor", [(1.0, False), (0.8, False), (0.5, True), (1 / 3, False),
                                                   (0.4, False)])
def test_exact_sampler_matches_tempered_distribution(temperature, as_tensor):
    draw = black_box(int(temperature * 1000), as_tensor)
    generator = torch.Generator().manual_seed(1)
    samples = [exact_temperature_sample(draw, temperature, generator) for _ in range(3000)]
    if as_tensor:
        assert all(s[1].item() == 7 for s in samples)
        samples = [s[0].item() for s in samples]
    counts = torch.bincount(torch.tensor(samples), minlength=5).double()
    target = tempered(P, 1 / temperature)
    assert chi_square_p_value(counts, target) > SIGNIFICANCE
    if temperature < 1:   # and the test has power: the untempered distribution is rejected
        assert chi_square_p_value(counts, P) < 1e-6


def test_exact_sampler_gives_up_after_max_draws():
    draw = black_box(0, size=1000)
    with pytest.raises(RuntimeError, match="raise T"):
        exact_temperature_sample(draw, 0.05, torch.Generator().manual_seed(0), max_draws=200)


def test_approximate_weights_and_fallback():
    values, probs = approximate_temperature_weights(["a", "a", "b", "c", "c", "c"], 3)
    assert values == ["a", "b", "c"] and probs.tolist() == [0.0, 0.0, 1.0]
    values, probs = approximate_temperature_weights(["a", "a", "b", "c", "c", "c"], 2)
    assert probs.tolist() == pytest.approx([0.25, 0.0, 0.75])      # C(2,2) : 0 : C(3,2)
    values, probs = approximate_temperature_weights([torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([1, 2])], 4)
    assert len(values) == 2 and probs.tolist() == [1.0, 0.0]                      # fallback to m = 2
    values, probs = approximate_temperature_weights([torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([1])], 4)
    assert len(values) == 3 and probs.tolist() == pytest.approx([1 / 3] * 3)      # fallback to m = 1
    generator = torch.Generator().manual_seed(0)
    assert approximate_temperature_sample(["a", "a", "b", "c", "c", "c"], 3, generator) == "c"
    with pytest.raises(ValueError):
        approximate_temperature_weights([], 2)


@pytest.mark.parametrize("n", [2, 3])
def test_approximate_sampler_converges_as_the_pool_grows(n):
    """Total variation between the sampler's output distribution (averaged over 300 pools) and p^n/Z."""
    g = torch.Generator().manual_seed(n)
    target = tempered(P, n)
    tv = []
    for pool_size in (4, 16, 64, 256):
        output = torch.zeros(5, dtype=torch.float64)
        for _ in range(300):
            values, probs = approximate_temperature_weights(
                torch.multinomial(P, pool_size, replacement=True, generator=g).tolist(), n)
            output[values] += probs
        tv.append(0.5 * (output / 300 - target).abs().sum().item())
    assert all(a > b for a, b in zip(tv, tv[1:])), tv
    # measured: n=2 [0.027, 0.020, 0.0041, 0.0006], n=3 [0.23, 0.042, 0.032, 0.0009]; 300 pools leave
    # a Monte Carlo floor near 0.001
    assert tv[-1] < 0.005 and tv[-1] < tv[0] / 4, tv
