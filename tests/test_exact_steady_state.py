"""Samples whose residual is exactly 0: already at their steady state, or reaching it exactly.

A ReLU cell ``relu(W z + x)`` with a negative injection has ``z = 0`` as its exact fixed point,
so a layer started at ``z0 = 0`` sees a residual of exactly 0 for those samples. ptc's step
growth divides the last residual by the new one (0 / 0 there): the default layer returned NaN
for such a sample while its stats said every sample converged, and an unrolled backward
through ptc spread NaN to every parameter.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import contdeq
from contdeq.solvers import FIXED_POINT_METHODS, STEADY_STATE_METHODS, fixed_point, steady_state


def _problem(dtype: torch.dtype, seed: int
             ) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
    """``g(z) = z* + A_b (z - z*)`` (contractive, per sample) and ``z0``, whose sample 0 is
    exactly ``z*`` (``g(z*) = z*`` to the last bit: ``A_b @ 0 = 0``)."""
    gen = torch.Generator().manual_seed(seed)
    batch, dim = 4, 3
    a = 0.5 * torch.randn(batch, dim, dim, generator=gen, dtype=dtype) / dim ** 0.5
    z_star = torch.randn(batch, dim, generator=gen, dtype=dtype)
    z0 = torch.randn(batch, dim, generator=gen, dtype=dtype)
    z0[0] = z_star[0]

    def g(z: Tensor) -> Tensor:
        return z_star + torch.einsum("bij,bj->bi", a, z - z_star)

    return g, z0, z_star


def _check(z: Tensor, stats: object, z0: Tensor, z_star: Tensor, tol: float,
           frozen: bool = True) -> None:
    """Finite, converged, at ``z*``; sample 0 never moved where converged samples freeze (an
    iteration without freezing may move it by rounding)."""
    assert torch.isfinite(z).all(), z
    assert stats.all_converged, stats
    if frozen:
        torch.testing.assert_close(z[0], z0[0], rtol=0, atol=0)
    torch.testing.assert_close(z, z_star, rtol=0, atol=100 * tol)
    t_final = getattr(stats, "t_final", None)
    assert t_final is None or torch.isfinite(t_final).all(), t_final


@pytest.mark.parametrize("method", sorted(STEADY_STATE_METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_sample_at_its_steady_state_stays_there(method: str, dtype: torch.dtype) -> None:
    """Catches a steady-state method moving (or poisoning with NaN) a sample whose residual
    is exactly 0 from the start, while other samples of the batch still iterate."""
    tol = 1e-5  # adaptive_heun (order 2) needs tens of thousands of steps at 1e-7
    for seed in range(3):
        g, z0, z_star = _problem(dtype, seed)
        z, stats = steady_state(lambda t, z, g=g: g(z) - z, z0, method=method, atol=tol, rtol=tol,
                                max_steps=5000)
        _check(z, stats, z0, z_star, tol)


@pytest.mark.parametrize("method", sorted(FIXED_POINT_METHODS))
@pytest.mark.parametrize("freeze", [True, False])
def test_a_sample_at_its_fixed_point_stays_there(method: str, freeze: bool) -> None:
    """The same for every fixed-point method, with and without per-sample freezing."""
    tol = 1e-9
    for seed in range(3):
        g, z0, z_star = _problem(torch.float64, seed)
        z, stats = fixed_point(g, z0, method=method, atol=tol, rtol=tol, max_steps=500,
                               freeze_converged=freeze)
        _check(z, stats, z0, z_star, tol, frozen=freeze)


class _ReLUCell(nn.Module):
    """``relu(W z + x)``, ``||W|| < 1``: ``z = 0`` is the exact fixed point where ``x <= 0``."""

    def __init__(self, width: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width, dtype=dtype)
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, 2))
            self.lin.bias.zero_()

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.relu(self.lin(z) + x)


def _relu_input(seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 5, generator=gen, dtype=dtype)
    x[0] = -1.0  # sample 0: z = 0 exactly, from the first evaluation on
    return x


def test_the_default_layer_keeps_a_sample_that_starts_at_its_equilibrium() -> None:
    """Catches the default layer (ptc) returning NaN for a sample whose residual is exactly 0
    at ``z0 = 0`` (a ReLU cell with a negative injection) while reporting it converged."""
    for seed in range(3):
        torch.manual_seed(seed)
        layer = contdeq.DEQ(_ReLUCell(5), atol=1e-6, rtol=1e-6)
        z = layer(_relu_input(seed))
        assert torch.isfinite(z).all(), z
        assert torch.equal(z[0], torch.zeros(5))
        assert layer.stats.forward.all_converged
        assert torch.isfinite(layer.stats.forward.t_final).all()


@pytest.mark.parametrize("tol", [1e-3, 1e-9])
def test_unrolled_ptc_gradients_are_finite_through_an_exact_steady_state(tol: float) -> None:
    """Catches an unrolled backward through ptc returning NaN gradients when a residual is
    exactly 0 (the step growth's 0 / 0 differentiated): gradients are finite and, solved
    tightly, agree with the implicit ones (the unrolled solve's derivative converges to the
    implicit one as the solve does; loosely solved, it is a truncated one)."""
    grads = {}
    for backward in ("unrolled", "implicit"):
        torch.manual_seed(0)
        layer = contdeq.DEQ(_ReLUCell(5, torch.float64), method="ptc", backward=backward,
                            atol=tol, rtol=tol, backward_rtol=1e-10)
        x = _relu_input(1, torch.float64).requires_grad_()
        (layer(x) * torch.linspace(-1, 1, 5, dtype=torch.float64)).sum().backward()
        grads[backward] = [x.grad, *(p.grad for p in layer.parameters())]
    for unrolled, implicit in zip(grads["unrolled"], grads["implicit"], strict=True):
        assert torch.isfinite(unrolled).all(), unrolled
        if tol < 1e-6:
            torch.testing.assert_close(unrolled, implicit, rtol=0, atol=1e-5)


def test_a_reopened_sample_frozen_at_an_exact_steady_state_restarts_finite() -> None:
    """Catches a sample frozen at a residual of exactly 0 (its step size then 0 / 0 = NaN)
    taking NaN steps when the final re-test reopens it (here ``func`` moves its steady state
    once the other samples have converged, as a stochastic or changed ``f`` can)."""
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    moved = {"target": torch.zeros(2, 3, dtype=torch.float64)}
    calls = {"n": 0}

    def func(t: Tensor, z: Tensor) -> Tensor:
        calls["n"] += 1
        if calls["n"] == 12:  # sample 0's steady state moves after it froze at residual 0
            moved["target"] = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]],
                                           dtype=torch.float64)
        target = moved["target"] + torch.tensor([[0.0], [2.0]], dtype=torch.float64)
        return (target - z) * torch.tensor([[1.0], [0.3]], dtype=torch.float64)

    z, stats = steady_state(func, z0, method="ptc", atol=1e-8, rtol=0.0, max_steps=500)
    assert torch.isfinite(z).all(), z
    assert stats.all_converged, stats
    torch.testing.assert_close(z, moved["target"] + torch.tensor([[0.0], [2.0]],
                                                                 dtype=torch.float64),
                               rtol=0, atol=1e-7)


def test_an_unrolled_solve_reports_without_a_scalar_conversion_warning() -> None:
    """Catches the stats' summary converting norms that carry an unrolled solve's graph with
    float() (PyTorch's "requires_grad=True to a scalar" UserWarning, pointing into contdeq)."""
    import warnings

    layer = contdeq.DEQ(_ReLUCell(5), method="ptc", backward="unrolled", atol=1e-6, rtol=1e-6)
    layer(_relu_input(2).requires_grad_())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = repr(layer.stats.forward)
    assert "residual" in text and layer.stats.forward.max_residual >= 0
