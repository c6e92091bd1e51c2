"""NeuralODE baseline: same vector field as the DEQ, exact NFE, adjoint, first-step rule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchdiffeq import odeint

import contdeq
from contdeq.solvers import ConvergenceError, NonFiniteError

from .layer_models import TanhCell


class Counted(nn.Module):
    """Wraps f and counts its calls."""

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f
        self.calls = 0

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.f(z, x)


def test_matches_torchdiffeq_on_the_same_vector_field() -> None:
    torch.manual_seed(0)
    f = TanhCell(5, 3)
    x = torch.randn(4, 3, dtype=torch.float64)
    node = contdeq.NeuralODE(f, t_end=2.0, rtol=1e-10, atol=1e-10, state_shape=5)
    with torch.no_grad():
        z = node(x)
        t = torch.tensor([0.0, 2.0], dtype=torch.float64)
        ref = odeint(lambda t, z: f(z, x) - z, torch.zeros(4, 5, dtype=torch.float64), t,
                     rtol=1e-10, atol=1e-10)[-1]
    torch.testing.assert_close(z, ref, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("adjoint", [False, True])
def test_nfe_counts_every_call(adjoint: bool) -> None:
    f = Counted(TanhCell(5, 3, dtype=torch.float32))
    node = contdeq.NeuralODE(f, adjoint=adjoint, state_shape=5)
    z = node(torch.randn(4, 3))
    assert node.stats.forward.nfe == f.calls
    forward_calls = f.calls
    z.sum().backward()
    if adjoint:
        assert node.stats.backward is not None
        assert node.stats.backward.nfe == f.calls - forward_calls > 0
    else:
        assert node.stats.backward is None and f.calls == forward_calls


def test_adjoint_gradients_match_backprop() -> None:
    torch.manual_seed(0)
    f = TanhCell(5, 3)
    x = torch.randn(4, 3, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        node = contdeq.NeuralODE(f, adjoint=adjoint, rtol=1e-10, atol=1e-10, state_shape=5,
                                 adjoint_options={"adjoint_rtol": 1e-10, "adjoint_atol": 1e-10})
        xr = x.clone().requires_grad_()
        f.zero_grad()
        node(xr).square().sum().backward()
        grads.append([xr.grad.clone(), *(p.grad.clone() for p in f.parameters())])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_adjoint_uses_the_normalization_of_its_forward(compiled: bool) -> None:
    """The adjoint pass of a call differentiates the f its forward solved, also when another
    training forward advanced spectral_norm_cap's power iteration in between (two losses,
    one backward); compiled, also after an earlier adjoint pass compiled f (the reference is
    eager)."""
    torch.manual_seed(0)
    f = TanhCell(5, 3)
    contdeq.spectral_norm_cap(f.W, cap=0.3, warmup_iterations=1)  # far from converged
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    grads = []
    for interleaved in (False, True):
        node = contdeq.NeuralODE(copy.deepcopy(f), adjoint=True, rtol=1e-10, atol=1e-10,
                                 state_shape=5, compile=compiled and interleaved,
                                 adjoint_options={"adjoint_rtol": 1e-10, "adjoint_atol": 1e-10})
        torch.autograd.grad(node(x2).square().sum(), list(node.parameters()))  # a first pass
        loss = node(x1).square().sum()
        if interleaved:
            node(x2)  # advances the power iteration
        grads.append(torch.autograd.grad(loss, list(node.parameters())))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_first_step_rule_saves_evaluations() -> None:
    """The steady-state solver's first-step rule vs torchdiffeq's own, from z0 = 0."""
    torch.manual_seed(0)
    f = TanhCell(16, 8, dtype=torch.float32)
    x = torch.randn(32, 8)
    ours = contdeq.NeuralODE(f, state_shape=16)
    theirs = contdeq.NeuralODE(f, state_shape=16, options={"first_step": None})
    with torch.no_grad():
        z_ours, z_theirs = ours(x), theirs(x)
    assert ours.stats.forward.nfe < theirs.stats.forward.nfe
    torch.testing.assert_close(z_ours, z_theirs, rtol=1e-3, atol=1e-4)


def test_plain_dynamics_option() -> None:
    """residual=False integrates dz/dt = f(z, x): a constant f gives z(t) = t * c."""

    class Constant(nn.Module):
        def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return torch.ones_like(z) * x.sum(dim=1, keepdim=True)

    node = contdeq.NeuralODE(Constant(), t_end=3.0, residual=False)
    x = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(node(x), 3.0 * x.sum(dim=1, keepdim=True).expand(4, 2))


def test_bad_arguments() -> None:
    f = TanhCell(5, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="t_end must be a finite float > 0"):
        contdeq.NeuralODE(f, t_end=0.0)
    with pytest.raises(ValueError, match="method must be one of"):
        contdeq.NeuralODE(f, method="ptc")
    with pytest.raises(ValueError, match="rtol must be a float > 0"):
        contdeq.NeuralODE(f, rtol=-1.0)


def test_step_limit_raises_instead_of_running_on() -> None:
    """A stiff field that needs more steps than allowed ends with ConvergenceError."""

    class Stiff(nn.Module):
        def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return -1e4 * z + x

    node = contdeq.NeuralODE(Stiff(), t_end=10.0, max_steps=20)
    with pytest.raises(ConvergenceError, match="did not reach t_end=10") as info:
        node(torch.randn(3, 2, dtype=torch.float64))
    assert not info.value.stats.converged.any() and info.value.stats.nfe > 20
    with pytest.raises(ValueError, match="max_steps must be an int >= 1"):
        contdeq.NeuralODE(Stiff(), max_steps=0)
    unstable = contdeq.NeuralODE(Stiff(), 10.0, method="rk4", options={"step_size": 0.5})
    with pytest.raises(NonFiniteError, match="contains NaN or Inf"):  # fixed steps: no limit
        unstable(torch.ones(1, 2))
