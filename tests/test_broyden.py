"""Broyden with a full memory: restarts instead of corrupting its inverse Jacobian."""

from __future__ import annotations

import pytest
import torch

from contdeq.implicit import solve_adjoint
from contdeq.solvers import fixed_point


def _orthogonal_layer(width: int, batch: int, c: float, seed: int):
    """``tanh(c Q z + x)``, ``Q`` orthogonal: every singular value at the bound ``c``."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(width, width, generator=gen, dtype=torch.float64))
    w = c * q
    x = 0.5 * torch.randn(batch, width, generator=gen, dtype=torch.float64)
    return lambda z: torch.tanh((w * z.unsqueeze(1)).sum(2) + x)


@pytest.mark.parametrize("memory", [30, 5])
def test_full_memory_on_a_contractive_map(memory: int) -> None:
    """``c = 0.99``, width 64: more than ``memory`` iterations are needed. Overwriting the
    oldest rank-one pair (the old behaviour) made this iterate diverge to NonFiniteError with
    memory 30; restarting converges, also when it restarts many times (memory 5)."""
    f = _orthogonal_layer(64, 8, 0.99, seed=2)
    z, stats = fixed_point(f, torch.zeros(8, 64, dtype=torch.float64), method="broyden",
                           memory=memory, max_steps=300, atol=1e-8, rtol=1e-8,
                           on_nonconvergence="raise")
    assert stats.steps > memory
    residual = (f(z) - z).pow(2).mean(1).sqrt()
    assert float(residual.max()) <= 2e-8


def test_backward_near_the_edge() -> None:
    """The implicit backward ``(I - J)^T w = v`` with ``J`` of spectral radius 0.97 and the
    default tolerance: the old Broyden returned relative errors around 0.1 at 100 steps (and
    NaN with more); now it agrees with the dense solution."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4, 64, 64, generator=gen, dtype=torch.float64)
    jac = 0.97 * g / torch.linalg.eigvals(g).abs().amax(1).reshape(4, 1, 1)
    v = torch.randn(4, 64, generator=gen, dtype=torch.float64)
    w, _ = solve_adjoint(lambda w: (jac * w.unsqueeze(2)).sum(1), v, method="broyden",
                         rtol=1e-4, max_steps=300, on_nonconvergence="raise")
    exact = torch.linalg.solve((torch.eye(64, dtype=torch.float64) - jac).transpose(1, 2), v)
    err = (w - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(err.max()) < 1e-2
