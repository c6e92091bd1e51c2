"""LyapunovDEQ: V = V_0(f(z, x) - z) is placed at the equilibrium, the projected field
decreases it, every solver's result stays in the start's sublevel set, and the layer's
gradients are the implicit ones of f."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchdiffeq import odeint

import contdeq
from contdeq.nn.lyapunov import ICNN, LyapunovDynamics, LyapunovFunction, smooth_relu
from contdeq.solvers import FIXED_POINT_METHODS, STEADY_STATE_METHODS
from tests.layer_models import TanhCell

D = 5
F64 = torch.float64
#: Every forward solver a LyapunovDEQ allows: each ODE method and each fixed-point method.
SOLVERS = [("ode", m) for m in STEADY_STATE_METHODS] + [(m, None) for m in FIXED_POINT_METHODS]


def dynamics(alpha: float = 1.0, lipschitz: float = 1.5) -> LyapunovDynamics:
    """A projected field whose nominal part is far from V-decreasing (large weights)."""
    return LyapunovDynamics(TanhCell(D, D, lipschitz=lipschitz), LyapunovFunction(D, (16, 16)),
                            alpha).double()


def apply(weights: Tensor, v: Tensor) -> Tensor:
    """``weights`` ``(M, P, Q)`` applied to ``v`` ``(M, N, Q)`` -> ``(M, N, P)`` (broadcast
    products: torch's float64 ``bmm`` backward is slow on tiny matrices)."""
    return (weights.unsqueeze(1) * v.unsqueeze(2)).sum(-1)


class BatchedTanh(nn.Module):
    """``M`` independent random models ``f_m(z, x) = tanh(W_m z + U_m x + b_m)`` on a batch of
    ``M * N`` samples (sample ``i`` belongs to model ``i // N``); ``||W_m||_2`` is drawn in
    ``[0.2, 1.6]``, so some models are far from contractive."""

    def __init__(self, models: int, per_model: int, dim: int, gen: torch.Generator) -> None:
        super().__init__()
        w = torch.randn(models, dim, dim, dtype=F64, generator=gen)
        norms = torch.linalg.matrix_norm(w, ord=2)
        scale = 0.2 + 1.4 * torch.rand(models, dtype=F64, generator=gen)
        self.W = nn.Parameter(w * (scale / norms)[:, None, None])
        self.U = nn.Parameter(torch.randn(models, dim, dim, dtype=F64, generator=gen))
        self.b = nn.Parameter(0.5 * torch.randn(models, 1, dim, dtype=F64, generator=gen))
        self.shape = (models, per_model, dim)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        zs, xs = z.reshape(self.shape), x.reshape(self.shape)
        out = torch.tanh(apply(self.W, zs) + apply(self.U, xs) + self.b)
        return out.reshape(z.shape)


class BatchedV0(nn.Module):
    """``M`` random convex positive definite ``V_0``: ``smooth_relu(g_m(r) - g_m(0)) +
    eps_m ||r||^2`` with the one-hidden-layer ICNN ``g_m(r) = u_m^T softplus(A_m r + c_m)``,
    ``u_m >= 0``."""

    def __init__(self, models: int, per_model: int, dim: int, gen: torch.Generator) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(models, 8, dim, dtype=F64, generator=gen))
        self.c = nn.Parameter(torch.randn(models, 1, 8, dtype=F64, generator=gen))
        self.u = nn.Parameter(torch.rand(models, 8, 1, dtype=F64, generator=gen))
        self.eps = 10 ** (-3 * torch.rand(models, 1, dtype=F64, generator=gen) - 0.5)
        self.shape = (models, per_model, dim)

    def g(self, r: Tensor) -> Tensor:
        return (F.softplus(apply(self.A, r) + self.c) * self.u.transpose(1, 2)).sum(-1)

    def forward(self, r: Tensor) -> Tensor:
        rs = r.reshape(self.shape)
        value = smooth_relu(self.g(rs) - self.g(torch.zeros_like(rs[:, :1])))
        return (value + self.eps * (rs * rs).sum(-1)).reshape(-1)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: small batched products are many times slower on a loaded 2-core
    machine with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sublevel_check(models: int, per_model: int, seed: int, max_steps: int) -> int:
    """``models x per_model`` random (model ``f``, ``V_0``, input, start) tuples for each
    allowed solver (fresh ones per solver): the returned state satisfies V(z) <= V(z0), the
    solve lowered V for at least 90 % of them (the bound is not met by standing still) and
    every converged sample is an equilibrium of f. Returns the number of tuples checked."""
    checked = 0
    for k, (solver, method) in enumerate(SOLVERS):
        gen = torch.Generator().manual_seed(1000 * seed + k)
        f = BatchedTanh(models, per_model, D, gen)
        v0_net = BatchedV0(models, per_model, D, gen)
        x = torch.randn(models * per_model, D, dtype=F64, generator=gen)
        z0 = 2 * torch.randn(models * per_model, D, dtype=F64, generator=gen)
        options = {} if method is None else {"method": method}
        layer = contdeq.LyapunovDEQ(f, D, lyapunov=v0_net, solver=solver, max_steps=max_steps,
                                    on_nonconvergence="ignore", **options)
        with torch.no_grad():
            z = layer.equilibrium_state(x, z0)
            v_start, v_end = layer.value(z0, x), layer.value(z, x)
            nominal = (f(z, x) - z).norm(dim=1)
        stats = layer.stats.forward
        assert bool((v_end <= v_start).all()), (solver, method)
        assert float((v_end < v_start).double().mean()) >= 0.9, (solver, method)
        # A converged sample is an equilibrium of the nominal f: the projection's
        # equilibria are f's, so the implicit gradient of f is the right one.
        ok = stats.converged
        if bool(ok.any()):
            bound = 10 * float(stats.tolerance[ok].max())
            assert float(nominal[ok].max()) <= bound, (solver, method)
        checked += len(x)
    return checked


def test_every_solver_ends_in_the_start_sublevel_set(one_thread: None) -> None:
    """1,100 random (model, V_0, input, start) tuples, 100 (10 models with ||W||_2 in
    [0.2, 1.6] x 10 inputs) for each of the 11 forward solvers (every ODE method and every
    fixed-point method): catches a solver whose result escapes the start's sublevel set, or
    equilibria of the projection that are not f's."""
    assert sublevel_check(10, 10, seed=0, max_steps=40) == 1100


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_every_solver_ends_in_the_start_sublevel_set_more_models(one_thread: None, seed: int
                                                                 ) -> None:
    """1,000 tuples (40 models x 25 inputs) for each of the 11 solvers, two seeds: 22,000."""
    assert sublevel_check(40, 25, seed=seed, max_steps=60) == 11_000


@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_projected_field_decreases_v_everywhere(alpha: float) -> None:
    """dV/dt <= -alpha V at random points, including points where the nominal field
    decreases V too slowly (so the projection is exercised): catches a sign or normalisation
    error in the Kolter-Manek projection."""
    torch.manual_seed(0)
    field = dynamics(alpha)
    z = 2 * torch.randn(1024, D, dtype=F64)
    x = 3 * torch.randn(1024, D, dtype=F64)
    v, grad = field.value_and_grad(z, x)
    with torch.no_grad():
        projected = ((field(z, x) - z) * grad).sum(1)
        nominal = ((field.f(z, x) - z) * grad).sum(1)
    assert int((nominal > -alpha * v).sum()) >= 10  # the nominal field violates the condition
    assert bool((projected <= -alpha * v + 1e-10 * v.abs().max()).all())


def test_v_is_zero_exactly_at_the_equilibrium() -> None:
    """V is placed at the equilibrium: V(z*) = 0 at the equilibrium of f (found by a tight
    solve of the plain DEQ), V > 0 at other points, and the projected map leaves z* where it
    is: catches a V centred anywhere else (the origin, the start)."""
    field = dynamics(lipschitz=0.8)
    x = torch.randn(16, D, dtype=F64)
    plain = contdeq.DEQ(field.f, state_shape=D, solver="anderson", atol=1e-13, rtol=1e-13,
                        max_steps=200)
    with torch.no_grad():
        z_star = plain(x)
        others = z_star + 0.3 * torch.randn_like(z_star)
        assert float(field.value(z_star, x).max()) < 1e-20
        assert bool((field.value(others, x) > 0).all())
        torch.testing.assert_close(field(z_star, x), z_star, rtol=0, atol=1e-12)
    assert float(z_star.norm(dim=1).min()) > 0.1  # not at the origin


def test_equilibrium_unstable_for_f_is_stable_for_the_projected_flow() -> None:
    """f(z) = tanh(2 z + x): its nonzero equilibria are attracting for the nominal flow, the
    equilibrium between them is not (f' > 1 there). Started next to that unstable equilibrium,
    the nominal flow leaves it while the projected flow returns to it, with V(z(t)) <=
    exp(-alpha t) V(z0): what Lyapunov stability of the equilibrium means."""
    f = TanhCell(1, 1)
    with torch.no_grad():
        f.W.weight.fill_(2.0)
        f.U.weight.fill_(1.0)
        f.U.bias.zero_()
    field = LyapunovDynamics(f, LyapunovFunction(1, (8,)), alpha=1.0).double()
    x = torch.full((4, 1), 0.1, dtype=F64)
    z_star = torch.full((4, 1), -0.1, dtype=F64)
    for _ in range(100):  # Newton on z = tanh(2z + 0.1) for the middle root
        g = torch.tanh(2 * z_star + x) - z_star
        z_star = z_star - g / (2 / torch.cosh(2 * z_star + x) ** 2 - 1)
    assert float(2 / torch.cosh(2 * z_star + x)[0, 0] ** 2) > 1  # f' > 1: unstable nominally
    z0 = z_star + torch.tensor([[-1e-2], [-1e-3], [1e-3], [1e-2]], dtype=F64)
    t = torch.linspace(0, 20, 41, dtype=F64)
    with torch.no_grad():
        nominal = odeint(lambda _, z: f(z, x) - z, z0, t, rtol=1e-9, atol=1e-11)
        projected = odeint(lambda _, z: field(z, x) - z, z0, t, rtol=1e-9, atol=1e-11)
        values = torch.stack([field.value(z, x) for z in projected])  # (T, B)
    assert float((nominal[-1] - z_star).abs().min()) > 0.1
    assert float((projected[-1] - z_star).abs().max()) < 1e-3
    bound = torch.exp(-t)[:, None] * values[0] + 1e-12
    assert bool((values <= bound * (1 + 1e-4)).all())


def test_defaults_do_not_warn() -> None:
    """With its defaults (ODE solver, implicit backward, ICNN V_0) on 3 random cells with
    ||W||_2 = 0.9, the layer raises no warning, forward or backward: catches a default
    backward linear solve that does not converge (the implicit backward of the old,
    origin-centred V did not)."""
    for seed in range(3):
        torch.manual_seed(seed)
        layer = contdeq.LyapunovDEQ(TanhCell(D, D, lipschitz=0.9), D).double()
        x = 2 * torch.randn(16, D, dtype=F64)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layer(x).square().sum().backward()
        assert bool(layer.stats.forward.converged.all())


@pytest.mark.parametrize("solver", ["ode", "anderson"])
def test_output_and_gradients_are_the_plain_deq_ones(solver: str) -> None:
    """Tight tolerances, 3 random cells: z* equals the plain DEQ's equilibrium of f and the
    parameter and input gradients equal the plain DEQ's implicit ones: catches a projection
    that moves equilibria, or a backward that differentiates the projected map (whose
    Jacobian at z* differs where the projection is active nearby)."""
    for seed in range(1 if solver == "ode" else 3):  # tight ODE solves are slow
        torch.manual_seed(seed)
        f = TanhCell(D, D, lipschitz=0.9)
        x = (2 * torch.randn(8, D, dtype=F64)).requires_grad_(True)
        tol = {"atol": 1e-11, "rtol": 1e-11, "backward_rtol": 1e-11, "backward_max_steps": 300}
        if solver == "ode":
            tol = {**tol, "atol": 1e-8, "rtol": 1e-8}
        layer = contdeq.LyapunovDEQ(f, D, hidden=(16,), solver=solver, **tol).double()
        plain = contdeq.DEQ(f, state_shape=D, solver="anderson", max_steps=300,
                            **{**tol, "atol": 1e-12, "rtol": 1e-12})
        z, z_ref = layer.equilibrium_state(x), plain(x)
        torch.testing.assert_close(z, z_ref, rtol=1e-6, atol=1e-6)
        weights = torch.randn_like(z)
        inputs = [x, *f.parameters()]
        grads = torch.autograd.grad((z * weights).sum(), inputs)
        ref = torch.autograd.grad((z_ref * weights).sum(), inputs)
        for g, r in zip(grads, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_unrolled_backward_trains_v() -> None:
    """With backward='unrolled' the gradient reaches V_0's parameters (through the projected
    steps); with the implicit backward it does not (z* does not depend on V): catches a V
    that is silently detached from the unrolled graph."""
    torch.manual_seed(0)
    f = TanhCell(D, D, lipschitz=1.2)
    x = 2 * torch.randn(8, D, dtype=F64)
    layer = contdeq.LyapunovDEQ(f, D, hidden=(8,), solver="picard", backward="unrolled",
                                max_steps=30, on_nonconvergence="ignore").double()
    layer(x).square().sum().backward()
    grads = [p.grad for p in layer.lyapunov.parameters()]
    assert any(g is not None and float(g.abs().max()) > 0 for g in grads)


def test_v_is_convex_and_positive_definite_for_any_raw_weights() -> None:
    """Whatever the raw parameters (here very negative), the ICNN's hidden weights are
    non-negative, V_0 is midpoint-convex, V_0(0) = 0 and V_0 > 0 elsewhere: catches a missing
    non-negativity constraint or an unanchored V_0."""
    v = LyapunovFunction(D, (8, 8)).double()
    with torch.no_grad():
        for p in v.parameters():
            p.copy_(torch.randn_like(p) * 3 - 2)
    for layer in v.icnn.hidden:
        assert float(layer.weight.detach().min()) >= 0
    a, b = torch.randn(2, 500, D, dtype=F64) * 3
    with torch.no_grad():
        assert bool((v((a + b) / 2) <= (v(a) + v(b)) / 2 + 1e-10).all())
        assert float(v(torch.zeros(1, D, dtype=F64))) == 0.0
        assert bool((v(a) > 0).all())


def test_bad_configurations_are_refused() -> None:
    """A non-convex activation, a negative hidden weight, eps <= 0, alpha <= 0, a
    state_shape, a non-module V_0 and backend='event' each raise a clear error."""
    with pytest.raises(ValueError, match="convex and non-decreasing"):
        ICNN(D, activation="tanh")
    icnn = ICNN(D, (4,))
    with pytest.raises(ValueError, match="non-negative"):
        icnn.hidden[0].weight = -torch.ones(1, 4)
    with pytest.raises(ValueError, match="eps must be"):
        LyapunovFunction(D, eps=0.0)
    with pytest.raises(ValueError, match="alpha must be"):
        contdeq.LyapunovDEQ(TanhCell(D, D), D, alpha=0.0)
    with pytest.raises(TypeError, match="state_shape"):
        contdeq.LyapunovDEQ(TanhCell(D, D), D, state_shape=D)
    with pytest.raises(TypeError, match="lyapunov must be"):
        contdeq.LyapunovDEQ(TanhCell(D, D), D, lyapunov=lambda r: r.sum(1))
    with pytest.raises(ValueError, match="backend='event'"):
        contdeq.LyapunovDEQ(TanhCell(D, D), D, backend="event")
    layer = contdeq.LyapunovDEQ(TanhCell(D, D + 1, dtype=torch.float32), D)
    with pytest.raises(ValueError, match="initial state of LyapunovDEQ"):
        layer(torch.randn(2, D + 1))


def test_gradcheck_float64() -> None:
    """torch.autograd.gradcheck of the projected map f_V(z, x) in z, x and V_0's parameters,
    first and second order (an unrolled backward differentiates f_V, whose grad V is itself
    an autograd result), at points where the projection is active: catches a missing
    create_graph or a wrong projection derivative."""
    torch.manual_seed(0)
    field = dynamics(alpha=3.0)
    z = 2 * torch.randn(64, D, dtype=F64)
    x = 3 * torch.randn(64, D, dtype=F64)
    v, grad = field.value_and_grad(z, x)
    with torch.no_grad():
        rate = ((field.f(z, x) - z) * grad).sum(1) + field.alpha * v
    active = (rate > 1e-3).nonzero().flatten()[:3]  # the correction term is differentiated
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


def test_orthogonal_layer_preserves_distances() -> None:
    """The layer after the equilibrium is orthogonal (Q^T Q = I for a square Q), so it keeps
    equilibria of different inputs exactly as far apart: catches a plain linear layer."""
    layer = contdeq.LyapunovDEQ(TanhCell(D, D, dtype=torch.float32), D)
    q = layer.orthogonal.weight
    torch.testing.assert_close(q.T @ q, torch.eye(D), atol=1e-5, rtol=0)


def test_attack_and_defence_solvers_keep_the_projected_field() -> None:
    """Inside unrolled_gradients (Anderson replaced by the ODE solver), entropy_reduction and
    random_intermediate_states (Broyden substituted), the layer still solves its projected
    field through a LyapunovSolver, and the unrolled solve ends at the layer's own
    equilibrium: catches a substituted solver that silently drops the projection (and solves
    another field)."""
    from contdeq.nn.lyapunov import LyapunovSolver
    from contdeq.robust import entropy_reduction, random_intermediate_states, unrolled_gradients

    torch.manual_seed(0)
    f = TanhCell(D, D, lipschitz=0.9)
    layer = contdeq.LyapunovDEQ(f, D, hidden=(8,), solver="anderson", atol=1e-7,
                                rtol=1e-7).double()
    model = nn.Sequential(layer, nn.Linear(D, 3, dtype=F64)).eval()
    x = 2 * torch.randn(6, D, dtype=F64)
    with torch.no_grad():
        z_ref = layer.equilibrium_state(x)
    calls: list[str] = []
    original = LyapunovSolver.__call__

    def spy(self: LyapunovSolver, fx: object, z0: torch.Tensor) -> object:
        calls.append(self.solver)
        return original(self, fx, z0)

    LyapunovSolver.__call__ = spy  # type: ignore[method-assign]
    try:
        with unrolled_gradients(model):
            xg = x.clone().requires_grad_(True)
            z = layer.equilibrium_state(xg)
            torch.autograd.grad(z.sum(), xg)
        assert calls == ["ode"]
        torch.testing.assert_close(z.detach(), z_ref, rtol=1e-4, atol=1e-4)
        with entropy_reduction(model, model[1], step_size=0.01, eps=0.05), torch.no_grad():
            model(x)
        assert calls == ["ode", "anderson"]
        model.train()
        with random_intermediate_states(model):
            model(x).sum().backward()
        assert calls == ["ode", "anderson", "broyden"]
    finally:
        LyapunovSolver.__call__ = original  # type: ignore[method-assign]
