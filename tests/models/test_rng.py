"""SampleRNG: a row's draws depend only on its seed, never on batch composition or slicing."""
import pytest
import torch

from calm_train.models.rng import SampleRNG, sample_seeds


def _draws(rng: SampleRNG):
    return rng.uniform(3, 5), rng.normal(7), rng.bernoulli(0.3, 2, 4)


def test_sample_seeds_are_distinct_and_well_mixed():
    seeds = sample_seeds(1234, 0, torch.arange(4096))
    assert seeds.dtype == torch.int64 and seeds.shape == (4096,)
    assert seeds.unique().numel() == 4096
    other = torch.cat([sample_seeds(1234, 1, torch.arange(4096)), sample_seeds(1235, 0, torch.arange(4096))])
    assert torch.isin(seeds, other).sum() == 0
    # adjacent ids give unrelated seeds: each of the 64 bits is set in ~half of them (4096 draws:
    # sd of the fraction is 0.0078; 0.05 is > 6 sd)
    bits = ((seeds.unsqueeze(1) >> torch.arange(64)) & 1).float().mean(0)
    assert (bits - 0.5).abs().max() < 0.05
    assert torch.equal(sample_seeds(1234, 0, torch.tensor([7, 3])), seeds[[7, 3]])


def test_rows_do_not_depend_on_batch_composition():
    seeds = sample_seeds(7, 3, torch.tensor([10, 11, 12, 13]))
    full = _draws(SampleRNG(seeds))
    for row in range(4):
        alone = _draws(SampleRNG(seeds[row:row + 1]))
        for a, f in zip(alone, full):
            assert torch.equal(a[0], f[row])
    reordered = _draws(SampleRNG(seeds[[3, 1, 0, 2]]))
    for r, f in zip(reordered, full):
        assert torch.equal(r, f[[3, 1, 0, 2]])


def test_narrow_matches_rows_and_shares_generators():
    seeds = sample_seeds(0, 0, torch.arange(5))
    reference = SampleRNG(seeds)
    first, second = reference.uniform(6), reference.uniform(6)

    rng = SampleRNG(seeds)
    part = rng.narrow(1, 3)
    assert len(part) == 3
    assert torch.equal(part.uniform(6), first[1:4])
    # the slice advanced rows 1..3 of its parent; rows 0 and 4 are still at their first draw
    after = rng.uniform(6)
    assert torch.equal(after[1:4], second[1:4])
    assert torch.equal(after[[0, 4]], first[[0, 4]])
    with pytest.raises(IndexError):
        rng.narrow(4, 2)


def test_draw_statistics_and_dtype():
    rng = SampleRNG(sample_seeds(1, 2, torch.arange(4)))
    u = rng.uniform(20000)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    z = rng.normal(20000)
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    assert abs(rng.bernoulli(0.15, 20000).float().mean().item() - 0.15) < 0.01
    # values are drawn in float32 and cast: the same seed gives the same (rounded) values in bf16
    a = SampleRNG(sample_seeds(1, 2, torch.arange(2))).normal(8, dtype=torch.bfloat16)
    b = SampleRNG(sample_seeds(1, 2, torch.arange(2))).normal(8).to(torch.bfloat16)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
