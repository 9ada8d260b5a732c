"""TokenLoader over real shards in real gloo processes: exactly-once epochs, TP partners, resume, elastic."""
import collections

from calm_train.data.dataset_info import read_dataset_info
from calm_train.data.shards import read_split


def _batch(per_rank: int, workers: int) -> int:
    """Largest batch <= 8 that splits a rank's samples evenly over its loader workers."""
    return max(b for b in range(1, 9) if per_rank % (b * max(1, workers)) == 0)


def _samples(data):
    return read_dataset_info(data).splits["train"]["samples"]


def test_every_sample_once_per_epoch_over_two_dp_ranks(rank_pool, prepared):
    n = _samples(prepared)
    rows = read_split(prepared, "train")
    for workers in (0, 2):
        batch = _batch(n // 2, workers)
        per_rank = rank_pool.run("dist_cases:one_epoch", 2, str(prepared), 1, batch, workers)
        ids = [i for r in per_rank for i, _ in r]
        assert n % 16 == 0 and len(per_rank[0]) == len(per_rank[1]) == n // 2
        assert sorted(ids) == list(range(n))              # each sample exactly once, none on both ranks
        assert all(int(rows[i].astype("int64").sum()) == s for r in per_rank for i, s in r)


def test_tp_partners_get_identical_batches(rank_pool, prepared):
    n = _samples(prepared)
    batch = _batch(n // 2, 0)
    r0, r1, r2, r3 = rank_pool.run("dist_cases:one_epoch", 4, str(prepared), 2, batch, 0)
    assert r0 == r1 and r2 == r3                      # tp=2 x dp=2: ranks (0,1) and (2,3) are replicas
    assert len(r0) == -(-n // 2) and set(i for i, _ in r0 + r2) == set(range(n))


def test_resume_mid_epoch_same_dp_and_elastic_two_to_one(rank_pool, prepared):
    n = _samples(prepared)
    for workers in (0, 2):
        batch = _batch(n // 2, workers)
        stop = 3 if workers else 5                    # odd stop: with 2 workers it ends on worker 0's batch
        first = rank_pool.run("dist_cases:first_part", 2, str(prepared), stop, batch, workers)
        states = [s for _, s in first]
        assert states[0] == states[1] and states[0]["sample_in_epoch"] == 2 * stop * batch
        seen = [i for ids, _ in first for i in ids]
        for world in (2, 1) if workers == 0 else (1,):
            rest = rank_pool.run("dist_cases:rest_of_epoch", world, str(prepared), states[0], batch, workers)
            counts = collections.Counter(seen + [i for ids, _ in rest for i in ids])
            assert sorted(counts.elements()) == list(range(n)), (world, workers)
            assert all(epoch == 1 for _, epoch in rest)


def test_one_pass_yields_the_partial_batch_and_counts_every_sample_once(rank_pool, prepared):
    """dp=3 does not divide the split: streaming repeats samples to even out the shares; `own` marks them."""
    n = _samples(prepared)
    assert n % 3 and -(-n // 3) % 9 and n % 9
    per_rank = rank_pool.run("dist_cases:one_pass", 3, str(prepared), 9)
    shares = [[i for ids, _ in r for i in ids] for r in per_rank]
    assert [len(s) for s in shares] == [-(-n // 3)] * 3                 # even shares, repeats included
    assert [len(ids) for ids, _ in per_rank[0]][-1] == -(-n // 3) % 9    # the final partial batch is read
    own = [i for r in per_rank for ids, mask in r for i, m in zip(ids, mask) if m]
    assert sorted(own) == list(range(n))
    (single,) = rank_pool.run("dist_cases:one_pass", 1, str(prepared), 9)
    assert [i for ids, _ in single for i in ids] == list(range(n)) and all(m for _, mask in single for m in mask)
