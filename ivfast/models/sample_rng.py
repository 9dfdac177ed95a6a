"""Per-sample random streams, so that randomness follows the sample and not the process.

Every random draw of a training step that depends on a sample (its mask, its diffusion
timesteps and noise) comes from a generator seeded by (run seed, step, global sample
index, stream name). The same sample therefore sees the same random numbers whether it is
processed on one rank or on another, in a run of one process or of many, and after a
resume. Draws are vectorised per sample (a loop over the local batch, not over tokens).
"""
from __future__ import annotations

import hashlib

import torch

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 63-bit hash of integers (splitmix64 chain): stable across processes and platforms."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h & ((1 << 63) - 1)


def _stream_id(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


class SampleRNG:
    """Random draws shaped (B, *shape), row b from sample b's own generator."""

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu"):
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)

    @classmethod
    def for_step(cls, run_seed: int, step: int, sample_indices, device="cpu") -> "SampleRNG":
        """Seeds for the samples at ``sample_indices`` (positions in the global batch order)."""
        return cls([_mix(run_seed, step, int(i)) for i in sample_indices], device)

    def __len__(self) -> int:
        return len(self.seeds)

    def stream_seeds(self, stream: str) -> torch.Tensor:
        """(B,) int64: one 63-bit seed per sample for ``stream`` (for in-kernel generators)."""
        sid = _stream_id(stream)
        return torch.tensor([_mix(s, sid) for s in self.seeds], dtype=torch.int64, device=self.device)

    def generators(self, stream: str) -> list[torch.Generator]:
        """One generator per sample for ``stream`` (for APIs that take per-sample generators)."""
        return list(self._iter_generators(stream))

    def _iter_generators(self, stream: str):
        sid = _stream_id(stream)
        for s in self.seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(_mix(s, sid))
            yield g

    def rand(self, stream: str, *shape: int) -> torch.Tensor:
        return torch.stack([torch.rand(shape, generator=g, device=self.device) for g in self._iter_generators(stream)])

    def randn(self, stream: str, *shape: int, dtype=torch.float32) -> torch.Tensor:
        return torch.stack(
            [torch.randn(shape, generator=g, device=self.device, dtype=dtype) for g in self._iter_generators(stream)]
        )

    def randint(self, stream: str, high: int, *shape: int) -> torch.Tensor:
        return torch.stack(
            [torch.randint(0, high, shape, generator=g, device=self.device) for g in self._iter_generators(stream)]
        )
