"""Generation: the KV-cached path yields exactly the tokens of the uncached path, for CALM and AR,
greedy and sampled; greedy is deterministic and matches the model's own argmax / mode; evaluation's rollouts
from the cache equal re-running every prefix."""
import dataclasses

import pytest
import torch

from calm_train.config import AutoencoderArch, BackboneArch, EnergyHeadArch, ModelConfig
from calm_train.models.ar import ARModel
from calm_train.models.autoencoder import Autoencoder
from calm_train.models.calm import CALM, freeze
from calm_train.models.generate import MAX_DRAW_BATCHES, choose_chunk, generate_ar, generate_calm
from calm_train.models.rng import SampleRNG
from calm_train.parallel import runtime

BACKBONE = BackboneArch(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
CALM_CFG = ModelConfig(kind="calm", vocab_size=96, patch_size=4, attention="sdpa", backbone=BACKBONE,
                       ae=AutoencoderArch(hidden_size=32, intermediate_size=64, latent_size=16),
                       head=EnergyHeadArch(num_blocks=2, noise_size=8, num_samples=4, num_target_samples=16))
AR_CFG = ModelConfig(kind="ar", vocab_size=96, attention="sdpa", backbone=BACKBONE)
PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module", autouse=True)
def world():
    with runtime.single_process(seed=0):
        yield


@pytest.fixture(scope="module")
def calm_pair():
    """An untrained CALM whose head draws a handful of distinct chunks (zero-initialised last layer
    replaced, offset away from z = 0 where a random decoder's logits all tie) and a sharp random AE."""
    torch.manual_seed(0)
    model = CALM(CALM_CFG).eval()
    last = model.generative_head.final_layer.linears[2]
    torch.nn.init.normal_(last.weight, std=0.5)
    torch.nn.init.normal_(last.bias, std=2.0)
    return model, freeze(Autoencoder(CALM_CFG.ae, 96, 4, init_std=0.2))


@pytest.mark.parametrize("temperature", [0.0, 0.5, 0.7])
def test_calm_cached_generation_equals_uncached(calm_pair, temperature):
    model, ae = calm_pair
    cached = generate_calm(model, ae, PROMPT, 10, temperature, seed=3, pad_id=0, num_samples=16)
    uncached = generate_calm(model, ae, PROMPT, 10, temperature, seed=3, pad_id=0, num_samples=16, use_cache=False)
    assert len(cached) == 10 and all(0 <= t < 96 for t in cached) and len(set(cached)) > 1
    assert cached == uncached


def test_calm_greedy_is_the_most_frequent_decoded_chunk(calm_pair):
    model, ae = calm_pair
    first = generate_calm(model, ae, PROMPT, 4, 0.0, seed=3, pad_id=0, num_samples=16)
    assert first == generate_calm(model, ae, PROMPT, 4, 0.0, seed=3, pad_id=0, num_samples=16)
    with torch.no_grad():
        hidden = model.hidden(torch.tensor([[0, 0, 0] + PROMPT]))[:, -1:]          # left-padded to 8 = 2K
        z = model.generative_head.sample(hidden, 16, SampleRNG(torch.tensor([3])))
        chunks = [tuple(c) for c in ae.decode(z[0])[0].tolist()]
    counts = {c: chunks.count(c) for c in chunks}
    assert counts[tuple(first)] == max(counts.values())


@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_ar_cached_generation_equals_uncached(temperature):
    torch.manual_seed(0)
    model = ARModel(AR_CFG).eval()
    cached = generate_ar(model, PROMPT, 8, temperature, seed=3)
    assert cached == generate_ar(model, PROMPT, 8, temperature, seed=3, use_cache=False)
    assert len(cached) == 8
    if temperature == 0:
        with torch.no_grad():
            assert cached[0] == int(model.logits(torch.tensor([PROMPT]))[0, -1].argmax())
    else:
        assert cached != generate_ar(model, PROMPT, 8, temperature, seed=4)


def test_invalid_requests_name_the_fix(calm_pair):
    model, ae = calm_pair
    with pytest.raises(ValueError, match="temperature 1.5 is outside"):
        generate_calm(model, ae, PROMPT, 4, 1.5, seed=0, pad_id=0)
    with pytest.raises(ValueError, match="at least one prompt token"):
        generate_ar(ARModel(AR_CFG), [], 4, 0.0, seed=0)


def test_exact_sampling_that_accepts_nothing_falls_back_to_the_pool_of_its_draws():
    calls = []

    def all_distinct_chunks(n):          # p(x) -> 0 for every chunk: exact rejection cannot accept
        calls.append(n)
        start = 4 * sum(calls[:-1])
        return torch.arange(start, start + 4 * n).view(n, 4)

    chunk = choose_chunk(all_distinct_chunks, 0.7, 8, torch.Generator().manual_seed(0))
    assert len(calls) == MAX_DRAW_BATCHES                               # the whole budget was drawn ...
    assert chunk.shape == (4,) and int(chunk[0]) % 4 == 0 and int(chunk[0]) < 4 * 8 * MAX_DRAW_BATCHES
    assert torch.equal(chunk, torch.arange(int(chunk[0]), int(chunk[0]) + 4))   # ... and one of its draws chosen


@pytest.mark.parametrize("multiple", [1, 2])
def test_calm_rollout_from_the_cache_equals_rerunning_each_prefix(multiple, monkeypatch):
    """rollout_calm (K=1: three steps per sample) against the whole prefix + sampled chunks re-run uncached with
    the same noise; a step padded to a multiple of 2 chunks (as under sequence parallelism) changes nothing."""
    from calm_train.models.attention import KVCache
    from calm_train.models.generate import rollout_calm
    cfg = dataclasses.replace(CALM_CFG, patch_size=1)
    torch.manual_seed(1)
    model = CALM(cfg).eval()
    last = model.generative_head.final_layer.linears[2]
    torch.nn.init.normal_(last.weight, std=0.5)
    torch.nn.init.normal_(last.bias, std=2.0)
    ae = freeze(Autoencoder(cfg.ae, 96, 1, init_std=0.2))
    monkeypatch.setattr(CALM, "sequence_multiple", multiple)
    tokens = torch.randint(96, (2, 8), generator=torch.Generator().manual_seed(0))
    first = torch.randint(96, (2, 3, 2, 1), generator=torch.Generator().manual_seed(1))     # [B, P, S, K]
    prefix = [2, 4, 5]
    with torch.no_grad():
        cache = KVCache()
        model.hidden(tokens, cache)
        got = rollout_calm(model, ae, cache, first, prefix, SampleRNG(torch.tensor([7, 8])), 4)
        rng = SampleRNG(torch.tensor([7, 8]))
        for p, length in enumerate(prefix):
            rows = [torch.cat([tokens[b, :length], first[b, p, s]]) for b in range(2) for s in range(2)]
            for _ in range(3):
                hidden = model.hidden(torch.stack(rows))[:, -1:]
                noise = (rng.uniform(2, 8) - 0.5).view(4, 1, 1, 8)
                nxt = ae.decode(model.generative_head(hidden, noise)[:, 0])[:, 0]
                rows = [torch.cat([r, c]) for r, c in zip(rows, nxt)]
            want = torch.stack([r[length:] for r in rows]).view(2, 2, 4)
            assert torch.equal(got[:, p], want)
    assert len(set(got.flatten().tolist())) > 4
