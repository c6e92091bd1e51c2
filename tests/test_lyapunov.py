"""LyapunovDEQ: the projected field decreases V, V is convex and positive definite, and the
layer's gradients are right with every solver and backward mode."""

from __future__ import annotations

import pytest
import torch
from torchdiffeq import odeint

import contdeq
from contdeq.nn.lyapunov import ICNN, LyapunovDynamics, LyapunovFunction
from contdeq.solvers import FIXED_POINT_METHODS, STEADY_STATE_METHODS, TABLEAUX
from tests.layer_models import TanhCell

D = 5
F64 = torch.float64


def dynamics(alpha: float = 0.0, lipschitz: float = 1.5) -> LyapunovDynamics:
    """A projected field whose nominal part is far from V-decreasing (large weights)."""
    return LyapunovDynamics(TanhCell(D, D, lipschitz=lipschitz), LyapunovFunction(D, (16, 16)),
                            alpha).double()


def v_derivative(field: LyapunovDynamics, z: torch.Tensor, x: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dV/dt along the projected field, along the nominal field, V)`` at ``z``."""
    v, grad = field.value_and_grad(z)
    projected = field(z, x) - z
    nominal = field.f(z, x) - z
    return (grad * projected).sum(1), (grad * nominal).sum(1), v


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_projected_field_decreases_v_everywhere(alpha: float) -> None:
    """dV/dt <= -alpha V at random points, including points where the nominal field
    increases V (so the projection is exercised): catches a sign or normalisation error in
    the Kolter-Manek projection."""
    field = dynamics(alpha)
    z = 0.5 * torch.randn(256, D, dtype=F64)
    x = 3 * torch.randn(256, D, dtype=F64)
    with torch.no_grad():
        projected, nominal, v = v_derivative(field, z, x)
    assert int((nominal > -alpha * v).sum()) > 20  # the nominal field violates the condition
    assert bool((projected <= -alpha * v + 1e-10).all())


def test_projection_is_finite_at_the_origin() -> None:
    """At z = 0, grad V = 0: the field is the nominal one and finite (no 0/0): catches a
    division by ||grad V||^2 without a guard."""
    field = dynamics()
    z = torch.zeros(3, D, dtype=F64)
    x = torch.randn(3, D, dtype=F64)
    with torch.no_grad():
        out = field(z, x)
    torch.testing.assert_close(out, field.f(z, x))


def test_v_nonincreasing_along_trajectories() -> None:
    """V never increases along the projected flow from random starts (dense output of an
    accurate ODE solve) and the steady-state solver's end point stays in the start's
    sublevel set: catches dynamics that only satisfy the condition pointwise at the start."""
    field = dynamics()
    z0 = 2 * torch.randn(8, D, dtype=F64)
    x = torch.randn(8, D, dtype=F64)
    t = torch.linspace(0, 8, 40, dtype=F64)
    with torch.no_grad():
        traj = odeint(lambda _, z: field(z, x) - z, z0, t, rtol=1e-8, atol=1e-10)
        values = torch.stack([field.lyapunov(z) for z in traj])  # (T, B)
    assert bool((values[1:] <= values[:-1] + 1e-9).all())
    assert float((values[0] - values[-1]).min()) >= 0
    # contdeq's own steady-state solver (converged or not: sliding along a level set can be
    # slow) ends inside the start's sublevel set too.
    layer = contdeq.LyapunovDEQ(field.f, D, hidden=(16, 16), max_steps=100,
                                on_nonconvergence="ignore").double()
    layer.f.lyapunov = field.lyapunov
    with torch.no_grad():
        z_end = layer.equilibrium_state(x, z0)
        assert bool((field.lyapunov(z_end) <= field.lyapunov(z0) + 1e-6).all())


@pytest.mark.parametrize(("solver", "method"), [("ode", m) for m in STEADY_STATE_METHODS]
                         + [(m, None) for m in FIXED_POINT_METHODS])
def test_v_along_every_solver_trajectory(solver: str, method: str | None) -> None:
    """V at every accepted step of every forward solver (read by a step callback), from random
    starts and inputs: the Runge-Kutta methods follow the flow, so V never rises by more than
    their local error; every solver (ptc and the discrete ones take steps too long to follow
    the flow) ends in the start's sublevel set. Catches a projection that a solver's steps
    escape, or a callback that misreports the states."""
    field = dynamics()
    gen = torch.Generator().manual_seed(3)
    z0 = 2 * torch.randn(8, D, dtype=F64, generator=gen)
    x = torch.randn(8, D, dtype=F64, generator=gen)
    values = [field.lyapunov(z0).detach()]

    def record(info: contdeq.solvers.StepInfo) -> None:
        values.append(field.lyapunov(info.z.reshape(8, D)).detach())

    options = {} if method is None else {"method": method}
    layer = contdeq.LyapunovDEQ(field.f, D, hidden=(16, 16), solver=solver, max_steps=60,
                                on_nonconvergence="ignore", callback=record, **options).double()
    layer.f.lyapunov = field.lyapunov
    with torch.no_grad():
        layer.equilibrium_state(x, z0)
    v = torch.stack(values)  # (steps + 1, B)
    assert len(values) > 5
    assert bool((v[-1] <= v[0] + 1e-9).all())
    if method in TABLEAUX:
        assert float((v[1:] - v[:-1]).max()) <= 1e-5 * float(v[0].max())


def test_v_is_convex_and_positive_definite_for_any_raw_weights() -> None:
    """Whatever the raw parameters (here very negative), the ICNN's hidden weights are
    non-negative, V is midpoint-convex, V(0) = 0 and V > 0 elsewhere: catches a missing
    non-negativity constraint or an unanchored V."""
    v = LyapunovFunction(D, (8, 8)).double()
    with torch.no_grad():
        for p in v.parameters():
            p.copy_(torch.randn_like(p) * 3 - 2)
    for layer in v.icnn.hidden:
        assert float(layer.weight.min()) >= 0
    a, b = torch.randn(2, 500, D, dtype=F64) * 3
    with torch.no_grad():
        assert bool((v((a + b) / 2) <= (v(a) + v(b)) / 2 + 1e-10).all())
        assert float(v(torch.zeros(1, D, dtype=F64))) == 0.0
        assert bool((v(a) > 0).all())


def test_non_convex_configurations_are_refused() -> None:
    """A non-convex activation, a negative hidden weight and eps <= 0 each raise a clear
    error: catches a silently non-convex or non-definite V."""
    with pytest.raises(ValueError, match="convex and non-decreasing"):
        ICNN(D, activation="tanh")
    icnn = ICNN(D, (4,))
    with pytest.raises(ValueError, match="non-negative"):
        icnn.hidden[0].weight = -torch.ones(1, 4)
    with pytest.raises(ValueError, match="eps must be"):
        LyapunovFunction(D, eps=0.0)
    with pytest.raises(TypeError, match="state_shape"):
        contdeq.LyapunovDEQ(TanhCell(D, D), D, state_shape=D)
    layer = contdeq.LyapunovDEQ(TanhCell(D, D + 1, dtype=torch.float32), D)
    with pytest.raises(ValueError, match="initial state of LyapunovDEQ"):
        layer(torch.randn(2, D + 1))


def interior_setup(solver: str, backward: str) -> tuple[contdeq.LyapunovDEQ, contdeq.DEQ]:
    """A LyapunovDEQ on which the nominal flow from ``z0 = x`` already decreases V, and the
    plain DEQ with the same f (tight tolerances).

    ``V = eps ||z||^2`` (the ICNN's input weights are zero, so its term vanishes) and
    ``f(z, x) = tanh(0.3 z + x / 2)``: the coordinates decouple, each moves monotonically from
    ``x_i`` to its equilibrium, which has the same sign and a smaller modulus, so ``|z|``
    shrinks, the projection stays inactive and the equilibrium is the plain DEQ's, with its
    smooth dependence on ``x``.
    """
    torch.manual_seed(1)
    f = TanhCell(D, D)
    with torch.no_grad():
        f.W.weight.copy_(0.3 * torch.eye(D))
        f.U.weight.copy_(0.5 * torch.eye(D))
        f.U.bias.zero_()
    tol = 1e-8 if solver == "ode" else 1e-11
    options = {"solver": solver, "backward": backward, "atol": tol, "rtol": tol,
               "backward_tol": 1e-11, "backward_max_steps": 300}
    lya = contdeq.LyapunovDEQ(f, D, hidden=(8,), **options).double()
    with torch.no_grad():
        for layer in lya.lyapunov.icnn.inputs:
            layer.weight.zero_()
    plain = contdeq.DEQ(f, state_shape=D, **options)
    return lya, plain


def interior_inputs() -> torch.Tensor:
    return 2 * torch.randn(4, D, dtype=F64)


@pytest.mark.parametrize("solver", ["ode", "anderson", "picard"])
@pytest.mark.parametrize("backward", ["implicit", "jfb"])
def test_interior_equilibrium_and_gradients_match_the_plain_deq(solver: str, backward: str
                                                               ) -> None:
    """Where the nominal flow already decreases V, the projection stays inactive: the output
    is Q z* of the plain DEQ with the same f, and f's parameter gradients equal the plain
    DEQ's (ODE and Picard solvers, both backward modes): catches a projection that
    moves interior equilibria or a backward that differentiates the wrong map."""
    lya, plain = interior_setup(solver, backward)
    x = interior_inputs()
    out = lya(x)
    ref = lya.orthogonal(plain(x))
    # Steps that overshoot the equilibrium (the ODE solver's last steps, Anderson's mixing)
    # land on a level set of V the flow cannot climb back from (alpha = 0): agreement to the
    # overshoot, not to the tolerance. Picard follows each coordinate monotonically here.
    tol = 1e-8 if solver == "picard" else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    if solver == "anderson":
        # Anderson's overshoot ends on the level set where the projection is active: the
        # projected Jacobian is singular in grad V's direction there (docs/robustness.md), so
        # its gradients are not the plain DEQ's.
        return
    weights = torch.randn_like(out)
    params = list(lya.f.f.parameters())
    g_lya = torch.autograd.grad((out * weights).sum(), params)
    g_ref = torch.autograd.grad((ref * weights).sum(), params)
    for a, b in zip(g_lya, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=100 * tol, atol=100 * tol)


def test_gradcheck_float64() -> None:
    """torch.autograd.gradcheck of the projected map f_V(z, x) in z, x and V's parameters,
    first and second order (the implicit backward takes VJPs of f_V, whose grad V is itself
    an autograd result), at points where the projection is active, and of the layer's
    orthogonal output map: catches a missing create_graph or a wrong projection derivative."""
    field = dynamics()
    z = 0.5 * torch.randn(64, D, dtype=F64)
    x = 3 * torch.randn(64, D, dtype=F64)
    with torch.no_grad():
        _, nominal, _ = v_derivative(field, z, x)
    active = (nominal > 1e-3).nonzero().flatten()[:3]  # the correction term is differentiated
    assert len(active) == 3
    z, x = z[active], x[active]
    z.requires_grad_(True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(field, (z, x), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(field, (z, x), eps=1e-6, atol=1e-5)
    weight = field.lyapunov.icnn.inputs[0].weight

    def by_weight(w: torch.Tensor) -> torch.Tensor:
        params = {"lyapunov.icnn.inputs.0.weight": w}
        return torch.func.functional_call(field, params, (z.detach(), x.detach()),
                                          strict=False)

    assert torch.autograd.gradcheck(by_weight, (weight.detach().clone().requires_grad_(True),),
                                    eps=1e-6, atol=1e-6)
    lya, _ = interior_setup("anderson", "implicit")
    xs = interior_inputs()[:2].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: lya.orthogonal(t), (xs,), eps=1e-6, atol=1e-6)


def test_orthogonal_layer_preserves_distances() -> None:
    """The layer after the equilibrium is orthogonal (Q^T Q = I for a square Q), so it keeps
    equilibria of different inputs exactly as far apart: catches a plain linear layer."""
    layer = contdeq.LyapunovDEQ(TanhCell(D, D, dtype=torch.float32), D)
    q = layer.orthogonal.weight
    torch.testing.assert_close(q.T @ q, torch.eye(D), atol=1e-5, rtol=0)
