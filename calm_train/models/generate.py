"""Text generation for CALM (K tokens per step) and the AR baseline (one token per step).

CALM step: h = backbone output at the last chunk -> head samples z ~ p(z | h) -> the frozen
autoencoder decodes each z (argmax per token) -> one chunk of K tokens is chosen -> appended.
The prompt is left-padded with `pad_id` to a multiple of K (an empty prompt becomes one chunk
of padding), so the generated chunks start right after the prompt's last token.

Choosing the chunk from decoded samples (the head is a black-box sampler, Section 5):
* temperature 0 (greedy): the most frequent chunk among `num_samples` decoded samples, ties to
  the first drawn.  This is the T -> 0 limit of p^(1/T) (the mode), estimated by counting;
  decoding the mean of the samples is not used: the mean of a multi-modal latent distribution
  can decode to a chunk that no sample produced.
* 1/T an integer n (T = 1, 1/2, 1/3, ...): the approximate batch algorithm over a pool of
  `num_samples` decoded chunks (`approximate_temperature_sample`); T = 1 is a plain draw.
* any other T in (0, 1): the exact rejection algorithm (`exact_temperature_sample`), fed from
  batches of `num_samples` decoded draws.  When it accepts nothing within MAX_DRAW_BATCHES
  batches (a spread-out distribution, typical of an undertrained model: on a GPU check an
  untrained-ish model at T = 0.7 exhausted 1600 draws), the approximate algorithm with
  n = round(1/T) chooses from all the draws made, rather than failing the request.

With `use_cache` the prompt runs once and each step feeds only the new chunk/token through
the backbone (KV cache); without it every step re-runs the whole sequence.  Both consume the
same random draws, so for a seed they produce the same tokens.  Randomness: a one-row
SampleRNG seeded with `seed` drives the head noise, a torch.Generator seeded with `seed` the
samplers' choices.  Both functions return the new tokens only.

`rollout_calm` continues sampled chunks for evaluation (Brier-n for n > K): many rollouts at once,
each a plain draw from the head (T = 1), from the KV cache of its own prefix.
"""
from __future__ import annotations

import torch

from calm_train.models.attention import KVCache
from calm_train.models.autoencoder import Autoencoder
from calm_train.models.rng import SampleRNG
from calm_train.models.sampling import (approximate_temperature_sample, approximate_temperature_weights,
                                        exact_temperature_sample, split_inverse_temperature)

MAX_DRAW_BATCHES = 100     # exact sampling gives up after this many batches of num_samples draws


class _DrawBudgetSpent(Exception):
    """Exact temperature sampling used its MAX_DRAW_BATCHES * num_samples draws without accepting."""


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def choose_chunk(draw_chunks, temperature: float, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """One chunk [K] from decoded head samples; draw_chunks(n) -> [n, K]."""
    if temperature == 0:
        values, probs = approximate_temperature_weights(list(draw_chunks(num_samples)), 1)
        return values[int(probs.argmax())]
    n, alpha = split_inverse_temperature(temperature)
    if alpha == 0:
        return approximate_temperature_sample(list(draw_chunks(num_samples)), n, generator)
    drawn: list[torch.Tensor] = []
    used = 0

    def draw() -> torch.Tensor:
        nonlocal used
        if used == len(drawn):
            if used == MAX_DRAW_BATCHES * num_samples:
                raise _DrawBudgetSpent
            drawn.extend(draw_chunks(num_samples))
        used += 1
        return drawn[used - 1]

    try:
        return exact_temperature_sample(draw, temperature, generator)
    except _DrawBudgetSpent:
        return approximate_temperature_sample(drawn, max(1, round(1 / temperature)), generator)


@torch.no_grad()
def generate_calm(model, autoencoder: Autoencoder, prompt_ids: list[int], max_new_tokens: int,
                  temperature: float, seed: int, pad_id: int, *, use_cache: bool = True,
                  num_samples: int = 64) -> list[int]:
    """Generate max_new_tokens tokens after prompt_ids with a CALM model (module docstring)."""
    if temperature < 0:
        raise ValueError(f"temperature {temperature} < 0: use 0 for greedy or a value in (0, 1]")
    K, device = model.patch_size, _device(model)
    prompt = list(prompt_ids) or [pad_id]
    tokens_BL = torch.tensor([[pad_id] * (-len(prompt) % K) + prompt], device=device)
    rng = SampleRNG(torch.tensor([seed]), device)
    generator = torch.Generator().manual_seed(seed)
    cache = KVCache() if use_cache else None
    step_BL, new = tokens_BL, []
    while len(new) < max_new_tokens:
        hidden_B1H = model.hidden(step_BL if use_cache else tokens_BL, cache)[:, -1:]

        def draw_chunks(n: int) -> torch.Tensor:
            z_B1ND = model.generative_head.sample(hidden_B1H, n, rng)
            return autoencoder.decode(z_B1ND[0].to(next(autoencoder.parameters()).dtype))[0].cpu()  # [n, K]

        chunk_K = choose_chunk(draw_chunks, temperature, num_samples, generator).to(device)
        new.extend(chunk_K.tolist())
        step_BL = chunk_K[None]
        tokens_BL = torch.cat([tokens_BL, step_BL], dim=1)
    return new[:max_new_tokens]


@torch.no_grad()
def rollout_calm(model, autoencoder: Autoencoder, cache: KVCache, first_BPSK: torch.Tensor, prefix_chunks: list[int],
                 rng: SampleRNG, num_tokens: int) -> torch.Tensor:
    """[B, P, S, num_tokens]: each of the S sampled chunks at position p continued with the model's own samples.

    `cache` holds the keys/values of the whole sequences (model.hidden(tokens, cache)); position p's rollouts
    start from its prefix (the first prefix_chunks[p] chunks), each step feeds every rollout its own last
    chunk, draws one head sample per rollout (noise [B, S] from row b's generator) and decodes it.  Under
    sequence parallelism a step's input is the chunk repeated to a multiple of the TP size and the cache is
    cut back after it: causal attention keeps the repeats out of the first position, the one that is used.
    """
    B, P, S, K = first_BPSK.shape
    rows_R = torch.arange(B, device=first_BPSK.device).repeat_interleave(S)
    multiple, head = model.sequence_multiple, model.generative_head
    out = []
    for p, length in enumerate(prefix_chunks):
        step_cache = cache.select(length, rows_R)
        chunks = [first_BPSK[:, p].reshape(B * S, K)]
        while len(chunks) * K < num_tokens:
            hidden_R1H = model.hidden(chunks[-1].repeat(1, multiple), step_cache)[:, :1]
            step_cache.truncate(step_cache.length - multiple + 1)
            noise_R11Z = (rng.uniform(S, head.noise_size, dtype=hidden_R1H.dtype) - 0.5).view(B * S, 1, 1, -1)
            chunks.append(autoencoder.decode(head(hidden_R1H, noise_R11Z)[:, 0])[:, 0])
        out.append(torch.cat(chunks, -1)[:, :num_tokens].view(B, S, num_tokens))
    return torch.stack(out, 1)


@torch.no_grad()
def generate_ar(model, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int, *,
                use_cache: bool = True) -> list[int]:
    """Token by token: temperature 0 = argmax, else a draw from softmax(logits / T)."""
    if not prompt_ids:
        raise ValueError("generate_ar needs at least one prompt token (e.g. the tokenizer's BOS id)")
    if temperature < 0:
        raise ValueError(f"temperature {temperature} < 0: use 0 for greedy or a positive value")
    device = _device(model)
    tokens_BL = torch.tensor([list(prompt_ids)], device=device)
    generator = torch.Generator().manual_seed(seed)
    cache = KVCache() if use_cache else None
    step_BL, new = tokens_BL, []
    for _ in range(max_new_tokens):
        logits_V = model.logits(step_BL if use_cache else tokens_BL, cache)[0, -1].cpu()
        if temperature == 0:
            token = int(logits_V.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(logits_V / temperature, -1), 1, generator=generator))
        new.append(token)
        step_BL = torch.tensor([[token]], device=device)
        tokens_BL = torch.cat([tokens_BL, step_BL], dim=1)
    return new
