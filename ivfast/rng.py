"""Seeds that follow the sample, not the process.

Every random draw of a step that depends on a sample (its mask, its diffusion timesteps and
noise) comes from a generator seeded by (run seed, data position, global sample index, stream
name), so a sample sees the same numbers on any rank, in a run of any size, and after a
resume. Draws loop over the samples of the local batch, never over tokens.
"""
from __future__ import annotations

import hashlib

import torch

_MASK64 = (1 << 64) - 1


def mix64(*values: int) -> int:
    """A 63-bit hash of integers (a splitmix64 chain): the same on every process and platform."""
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
        return cls([mix64(run_seed, step, int(i)) for i in sample_indices], device)

    def __len__(self) -> int:
        return len(self.seeds)

    def stream_seeds(self, stream: str) -> torch.Tensor:
        """(B,) int64: one 63-bit seed per sample for ``stream`` (for in-kernel generators)."""
        sid = _stream_id(stream)
        return torch.tensor([mix64(s, sid) for s in self.seeds], dtype=torch.int64, device=self.device)

    def generators(self, stream: str) -> list[torch.Generator]:
        """One generator per sample for ``stream`` (for APIs that take per-sample generators)."""
        return list(self._iter_generators(stream))

    def _iter_generators(self, stream: str):
        sid = _stream_id(stream)
        for s in self.seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(mix64(s, sid))
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
