"""Per-sample deterministic randomness.

Every random draw of a training step (autoencoder masking, posterior noise, latent dropout,
energy-head noise) comes from one `torch.Generator` per *sample*, seeded by
`sample_seeds(base_seed, step, sample_id)`.  A sample's noise therefore does not depend on
which data-parallel rank, pipeline micro-batch or gradient-accumulation slice it lands in, nor
on how many samples share its batch: a parallel layout or a resumed run reproduces the
single-process run's draws exactly.

Row b of every draw comes from generator b only, drawn in float32 and then cast, so the values
are also independent of the requested dtype.  Generators live on the device of the tensors
they produce (CPU and CUDA generators give different streams for the same seed; a run is
reproducible on one device type).
"""
from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of splitmix64 (Steele, Lea & Flood 2014): a bijective, well-mixing 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _to_int64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


EVAL_STEP = 0   # the `step` of sample_seeds for evaluation (training steps start at 1): every evaluation draws the same noise


def sample_seeds(base_seed: int, step: int, sample_ids: torch.Tensor) -> torch.Tensor:
    """int64 [B]: splitmix64(splitmix64(splitmix64(base_seed) ^ step) ^ sample_id) per sample."""
    head = _splitmix64(_splitmix64(base_seed & _MASK64) ^ (step & _MASK64))
    ids = sample_ids.reshape(-1).tolist()
    return torch.tensor([_to_int64(_splitmix64(head ^ (int(i) & _MASK64))) for i in ids], dtype=torch.int64)


class SampleRNG:
    """One generator per batch row; draws are [B, *shape], row b from generator b."""

    def __init__(self, seeds: torch.Tensor, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = []
        for seed in seeds.reshape(-1).tolist():
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(seed) & _MASK64)
            self.generators.append(gen)

    @classmethod
    def _from_generators(cls, generators: list[torch.Generator], device: torch.device) -> "SampleRNG":
        rng = cls.__new__(cls)
        rng.device, rng.generators = device, generators
        return rng

    def __len__(self) -> int:
        return len(self.generators)

    def narrow(self, start: int, length: int) -> "SampleRNG":
        """Rows start..start+length; shares (and advances) the parent's generators."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"SampleRNG.narrow({start}, {length}) is outside its {len(self)} rows")
        return SampleRNG._from_generators(self.generators[start:start + length], self.device)

    def uniform(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[B, *shape] uniform in [0, 1)."""
        rows = [torch.rand(shape, generator=g, device=self.device, dtype=torch.float32) for g in self.generators]
        return self._stack(rows, shape).to(dtype)

    def normal(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[B, *shape] standard normal."""
        rows = [torch.randn(shape, generator=g, device=self.device, dtype=torch.float32) for g in self.generators]
        return self._stack(rows, shape).to(dtype)

    def bernoulli(self, p: float, *shape: int) -> torch.Tensor:
        """bool [B, *shape], True with probability p."""
        return self.uniform(*shape) < p

    def _stack(self, rows: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        if not rows:
            return torch.empty((0, *shape), device=self.device)
        return torch.stack(rows)
