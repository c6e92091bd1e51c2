"""``fixed_point(method="newton")``: Newton-Krylov with a per-sample Armijo line search."""

from __future__ import annotations

import pytest
import torch

from contdeq.solvers import fixed_point

from .problems import CallCounter, spd_batch


def tanh_layer(width: int, batch: int, lipschitz: float):
    """``f(z) = tanh(W z + x)`` with ``||W||_2 = lipschitz`` and its fixed point (float64 Picard).
    Products by broadcasting: float64 BLAS with two threads crawls on a loaded CPU."""
    w = torch.randn(width, width, dtype=torch.float64)
    w = lipschitz * w / torch.linalg.matrix_norm(w, 2)
    x = torch.randn(batch, width, dtype=torch.float64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh((w * z.unsqueeze(1)).sum(2) + x)

    z = torch.zeros(batch, width, dtype=torch.float64)
    for _ in range(3000):
        z = f(z)
    return f, z


def test_contractive_layer_near_the_edge() -> None:
    """A tanh layer with Lipschitz constant 0.99 (Picard needs hundreds of steps): Newton
    converges in a few steps, to the float64 reference; catches a wrong sign of ``I - J``."""
    f, reference = tanh_layer(16, 4, lipschitz=0.99)
    z, stats = fixed_point(f, torch.zeros_like(reference), method="newton", atol=1e-9,
                           rtol=1e-9, on_nonconvergence="raise")
    assert stats.steps <= 8
    torch.testing.assert_close(z, reference, atol=1e-7, rtol=0)


def test_non_contractive_linear_map() -> None:
    """``g(z) = z + b - A z`` with A's eigenvalues in [0.5, 40]: Picard and Anderson iterate
    an expanding map; Newton solves ``A z = b`` (checked against a dense solve)."""
    a = spd_batch(3, 20, torch.float64, lo=0.5, hi=40.0)
    b = torch.randn(3, 20, dtype=torch.float64)

    def g(z: torch.Tensor) -> torch.Tensor:
        return z + b - (a * z.unsqueeze(1)).sum(2)

    z, _ = fixed_point(g, torch.zeros_like(b), method="newton", atol=1e-8, rtol=1e-8,
                           on_nonconvergence="raise")
    torch.testing.assert_close(z, torch.linalg.solve(a, b), atol=1e-7, rtol=0)


def test_line_search_per_sample() -> None:
    """``r(z) = -arctan(z - c)``: from 3 away the full Newton step overshoots and diverges
    (|z - c| > 1.39); the Armijo backtracking must rescue that sample without slowing the one
    that starts close."""
    c = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)

    def g(z: torch.Tensor) -> torch.Tensor:
        return z - torch.atan(z - c)

    z0 = c + torch.tensor([[3.0], [0.1]], dtype=torch.float64)
    z, _ = fixed_point(g, z0, method="newton", atol=1e-10, rtol=0.0,
                           on_nonconvergence="raise")
    torch.testing.assert_close(z, c, atol=1e-9, rtol=0)
    # Without the line search the first sample runs away.
    far = c[:1] + 3.0
    for _ in range(3):
        far = far - torch.atan(far - c[:1]) * (1 + (far - c[:1]) ** 2)
    assert float((far - c[:1]).abs()) > 10


def test_counts_by_hand() -> None:
    """``g(z) = z / 2 + b`` is linear with ``J = I / 2``: one Newton step with one GMRES product
    solves it. Evaluations: the loop's first ``g(z0)``, the graph at ``z0`` for the Jacobian
    products, and the line search's trial, whose value the loop reuses (no fourth call).
    Catches a double evaluation per iteration or JVPs counted as evaluations."""
    b = torch.randn(4, 6, dtype=torch.float64)
    g = CallCounter(lambda z: z / 2 + b)
    z, stats = fixed_point(g, torch.zeros_like(b), method="newton", on_nonconvergence="raise")
    torch.testing.assert_close(z, 2 * b)
    assert (stats.steps, stats.nfe, g.calls, stats.jvps, stats.linear_iterations) == (
        1, 3, 3, 1, 1)


@pytest.mark.slow
def test_forward_mode_products_agree() -> None:
    """``jvp="forward"`` takes the same iterates as the default double-VJP products: catches a
    transposed Jacobian in either. Slow: forward-mode AD's first use sets up for seconds."""
    f, reference = tanh_layer(8, 3, lipschitz=0.95)
    z0 = torch.zeros_like(reference)
    z_rev, s_rev = fixed_point(f, z0, method="newton")
    z_fwd, s_fwd = fixed_point(f, z0, method="newton", jvp="forward")
    torch.testing.assert_close(z_fwd, z_rev, atol=1e-10, rtol=0)
    assert s_fwd.jvps == s_rev.jvps


@pytest.mark.parametrize(("option", "value", "match"), [
    ("restart", 0, "restart"), ("jvp", "central", "jvp"),
    ("line_search_steps", 1.5, "line_search_steps"), ("line_search_steps", -1, "line_search"),
    ("forcing", 1.0, "forcing"), ("globalization", "dogleg", "globalization"),
    ("trust_radius", -1.0, "trust_radius"),
])
def test_bad_options(option: str, value: object, match: str) -> None:
    """Bad options raise at construction and name the option."""
    with pytest.raises((ValueError, TypeError), match=match):
        fixed_point(lambda z: z / 2, torch.ones(2, 3), method="newton", **{option: value})


def test_full_steps_count() -> None:
    """``line_search_steps=0``: one evaluation per iteration (the full step, no backtracking),
    plus the one at z0 and the one recording its graph; exact linear solves (``forcing``) make
    a linear map converge in one iteration."""
    a = spd_batch(3, 12, torch.float64, hi=50.0)
    b = torch.randn(3, 12, dtype=torch.float64)
    g = CallCounter(lambda z: z - (torch.bmm(a, z.unsqueeze(2)).squeeze(2) - b))
    z, stats = fixed_point(g, torch.zeros(3, 12, dtype=torch.float64), method="newton",
                           line_search_steps=0, forcing=1e-10, atol=1e-9, rtol=0.0)
    assert stats.all_converged and stats.steps == 1 and stats.nfe == g.calls == 3
    torch.testing.assert_close(z, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-8)


def test_trust_region_on_a_nonconvex_map() -> None:
    """The dogleg trust region per sample: every sample of ``F(z) = z^3 - c`` (as the map
    ``z - F(z)``) from a far start converges to the cube roots with the residual's norm never
    rising between accepted iterates (a trust region only accepts decreases)."""
    c = torch.tensor([[1.0, 8.0], [27.0, -8.0]], dtype=torch.float64)
    z, stats = fixed_point(lambda z: z - (z**3 - c), torch.full((2, 2), 10.0,
                                                                dtype=torch.float64),
                           method="newton", globalization="trust_region", atol=1e-10,
                           rtol=0.0, max_steps=200, record_trajectory=True)
    assert stats.all_converged
    torch.testing.assert_close(z, torch.sign(c) * c.abs() ** (1 / 3))
    history = stats.residual_history
    assert bool((history[1:] <= history[:-1] * (1 + 1e-12)).all())
