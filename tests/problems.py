"""Test problems with known steady states / fixed points."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def spd_batch(batch: int, dim: int, dtype: torch.dtype, lo: float = 0.5, hi: float = 2.0,
              seed: int = 0) -> Tensor:
    """``(B, D, D)`` symmetric positive definite matrices with eigenvalues in ``[lo, hi]``."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, dim, dim, generator=gen, dtype=torch.float64))
    eig = lo + (hi - lo) * torch.rand(batch, dim, generator=gen, dtype=torch.float64)
    return (q @ torch.diag_embed(eig) @ q.transpose(1, 2)).to(dtype)


def linear_ode(a: Tensor, b: Tensor) -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor]:
    """``dz/dt = b - A z`` on ``(B, D)`` states and its steady state ``A^{-1} b``."""

    def func(t: Tensor, z: Tensor) -> Tensor:
        return b - torch.bmm(a, z.unsqueeze(2)).squeeze(2)

    return func, torch.linalg.solve(a.double(), b.double()).to(a.dtype)


def tanh_layer(width: int, batch: int, dtype: torch.dtype, lipschitz: float = 0.9,
               seed: int = 0) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """A contractive DEQ layer ``f(z) = tanh(W z + U x)`` and its fixed point (float64 Picard)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(width, width, generator=gen, dtype=torch.float64)
    w = lipschitz * w / torch.linalg.matrix_norm(w, 2)
    ux = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    z = torch.zeros(batch, width, dtype=torch.float64)
    for _ in range(2000):
        z = torch.tanh(z @ w.T + ux)
    w_, ux_ = w.to(dtype), ux.to(dtype)

    def f(z: Tensor) -> Tensor:
        return torch.tanh(z @ w_.T + ux_)

    return f, z.to(dtype)


class CallCounter:
    """Counts the calls of a wrapped function."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: Tensor) -> Tensor:
        self.calls += 1
        return self.fn(*args)
