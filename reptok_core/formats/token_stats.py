"""Token statistics and normalisation: stage 2 learns on tokens normalised per dimension to zero
mean and unit std, or divided by one scalar as the official code does (reptok_core/flow.py)."""

from __future__ import annotations

import torch
import torch.nn as nn


class TokenNormalizer(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer(
            "std", torch.as_tensor(std, dtype=torch.float32).clamp_min(eps).clone()
        )

    @classmethod
    def identity(cls, dim: int) -> TokenNormalizer:
        return cls(torch.zeros(dim), torch.ones(dim))

    @classmethod
    def scalar(cls, dim: int, scale_factor: float) -> TokenNormalizer:
        """The official RepTok scaling, z / scale_factor (conventions: reptok_core/flow.py)."""
        if not scale_factor > 0:
            raise ValueError(f"token scale_factor must be > 0, got {scale_factor}")
        return cls(torch.zeros(dim), torch.full((dim,), float(scale_factor)))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.to(z.dtype)) / self.std.to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z.dtype) + self.mean.to(z.dtype)


class RunningStats:
    """Streaming per-dimension mean / std (Chan's parallel update), mergeable across workers."""

    def __init__(self, dim: int):
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1, self.mean.numel())
        self.merge(x.shape[0], x.mean(0), ((x - x.mean(0)) ** 2).sum(0))

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.n * n / total
        self.n = total

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / max(self.n - 1, 1)).sqrt()
