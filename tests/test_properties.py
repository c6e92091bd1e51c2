"""Property-based tests over random contractive linear maps."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contdeq.solvers import FIXED_POINT_METHODS, fixed_point, steady_state


def _contraction(seed: int, batch: int, dim: int, radius: float) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(batch, dim, dim, generator=gen, dtype=torch.float64)
    m = radius * m / torch.linalg.matrix_norm(m, 2).reshape(batch, 1, 1)
    c = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    eye = torch.eye(dim, dtype=torch.float64)
    z_star = torch.linalg.solve(eye - m, c)
    return m, c, z_star


maps = st.tuples(
    st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(1, 12), st.floats(0.0, 0.95)
)


def assert_within_contraction_bound(z: torch.Tensor, stats, z_star: torch.Tensor,
                                    radius: float) -> None:
    """Every sample converged, consistently, and ``rms(z - z*) <= residual / (1 - radius)``."""
    assert stats.all_converged
    assert torch.equal(stats.converged, stats.residual <= stats.tolerance)
    bound = stats.residual / (1.0 - radius) * 1.01 + 1e-12
    assert bool(((z - z_star).pow(2).mean(1).sqrt() <= bound).all())


@settings(max_examples=40, deadline=None)
@given(maps, st.sampled_from(list(FIXED_POINT_METHODS)))
def test_fixed_point_solves_random_contractions(problem: tuple, method: str) -> None:
    m, c, z_star = _contraction(*problem)
    z, stats = fixed_point(lambda z: torch.bmm(m, z.unsqueeze(2)).squeeze(2) + c,
                           torch.zeros_like(c), method=method, atol=1e-9, rtol=0.0,
                           max_steps=2000)
    assert_within_contraction_bound(z, stats, z_star, radius=problem[3])


@settings(max_examples=30, deadline=None)
@given(maps, st.sampled_from(["dopri5", "tsit5", "bosh3", "ptc"]))
def test_steady_state_solves_random_contractions(problem: tuple, method: str) -> None:
    m, c, z_star = _contraction(*problem)
    z, stats = steady_state(lambda t, z: torch.bmm(m, z.unsqueeze(2)).squeeze(2) + c - z,
                            torch.zeros_like(c), method=method, atol=1e-8, rtol=0.0,
                            max_steps=5000)
    assert_within_contraction_bound(z, stats, z_star, radius=problem[3])
