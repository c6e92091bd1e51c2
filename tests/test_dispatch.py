"""The registry is the dispatch: a registered steady-state method works everywhere, options
come from signatures, and one function dispatches an equilibrium solver choice."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import contdeq
from contdeq.solvers import (
    FIXED_POINT_METHODS,
    PTC,
    STEADY_STATE_METHODS,
    RungeKutta,
    Solution,
    Stepper,
    check_options,
    fixed_point,
    option_names,
    run_loop,
    sample_rms,
    solve,
    steady_state,
)
from tests.layer_models import TanhCell


class HalfEulerSteps(Stepper):
    """A toy stepper: forward Euler with a fixed step of 1/2, frozen samples held (the loop,
    :func:`contdeq.solvers.run_loop`, does the rest)."""

    def __init__(self, func, d, control):
        self.func, self.d, self.t_max = func, d, control.t_max

    def stop_reason(self, progress):
        return progress.stop_reason(self.t_max)

    def step(self, z, progress):
        moved = progress.active
        z = torch.where(moved.unsqueeze(1), z + 0.5 * self.d, z)
        self.d = self.func(0.0, z)
        progress.update(z, sample_rms(self.d), moved, 0.5)
        return z, True

    def restart(self, z, progress):
        self.d = self.func(0.0, z)
        progress.restart(z, sample_rms(self.d))

    def retest(self, z, progress):
        return progress.reopen_stale(z, sample_rms(self.d))


class HalfEuler:
    """A toy steady-state method (the contract of
    :class:`contdeq.solvers.SteadyStateSolver`): its stepper on the one loop."""

    name = "half_euler"
    local_error_control = False
    default_max_step = math.inf
    compilable = False

    def run(self, func, z, d, progress, control, hook):
        return run_loop(HalfEulerSteps(func, d, control), z, progress, hook)


@pytest.fixture
def half_euler():
    STEADY_STATE_METHODS.register("half_euler", HalfEuler())
    try:
        yield "half_euler"
    finally:
        STEADY_STATE_METHODS.unregister("half_euler")
    assert "half_euler" not in STEADY_STATE_METHODS


def _contraction(batch: int = 4, width: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(width, width, generator=gen, dtype=torch.float64)
    w = 0.5 * w / torch.linalg.matrix_norm(w, 2)
    x = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    return (lambda z: torch.tanh(z @ w.T + x)), torch.zeros(batch, width, dtype=torch.float64)


def test_a_registered_method_runs_in_steady_state_layers_and_backward(half_euler):
    f, z0 = _contraction()
    z, stats = steady_state(lambda t, z: f(z) - z, z0, method=half_euler, atol=1e-8, rtol=0.0)
    assert stats.method == half_euler and stats.all_converged
    # dz/dt = f(z) - z with h = 1/2: the residual halves at least... every step it shrinks.
    assert stats.nfe == stats.steps + 1
    assert torch.allclose(z, f(z), atol=1e-7)
    cell = TanhCell(3, 2)
    layer = contdeq.DEQ(cell, state_shape=3, method=half_euler, atol=1e-8, rtol=0.0,
                        backward=contdeq.Implicit(rtol=1e-8))
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert layer.stats.forward.method == half_euler
    out.sum().backward()
    assert layer.stats.backward.all_converged
    reference = contdeq.DEQ(cell, state_shape=3, method="dopri5", atol=1e-8, rtol=0.0,
                            backward=contdeq.Implicit(rtol=1e-8))
    x_ref = x.detach().clone().requires_grad_(True)
    reference(x_ref).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)


def test_an_unregistered_method_is_rejected_by_name(half_euler):
    STEADY_STATE_METHODS.unregister(half_euler)
    try:
        with pytest.raises(ValueError, match="method must be one of"):
            steady_state(lambda t, z: -z, torch.ones(2, 2), method=half_euler)
        with pytest.raises(ValueError, match="method must be one of"):
            contdeq.DEQ(TanhCell(3, 2), method=half_euler)
    finally:
        STEADY_STATE_METHODS.register(half_euler, HalfEuler())


def test_a_solver_object_equals_its_name():
    f, z0 = _contraction()
    fn = lambda t, z: f(z) - z  # noqa: E731
    z_obj, s_obj = steady_state(fn, z0, method=PTC())
    z_str, s_str = steady_state(fn, z0, method="ptc")
    assert torch.equal(z_obj, z_str) and (s_obj.nfe, s_obj.steps) == (s_str.nfe, s_str.steps)
    with pytest.raises(TypeError, match="SteadyStateSolver"):
        steady_state(fn, z0, method=object())


def test_options_come_from_the_signatures():
    steady = {n for n, p in inspect.signature(steady_state).parameters.items()
              if p.kind is p.KEYWORD_ONLY} - {"on_nonconvergence"}
    assert set(option_names("ode")) == steady and "per_sample" in steady
    fixed = {n for n, p in inspect.signature(fixed_point).parameters.items()
             if p.kind is p.KEYWORD_ONLY} - {"on_nonconvergence", "method"}
    for method, cls in FIXED_POINT_METHODS.items():
        own = {n for n, p in inspect.signature(cls.__init__).parameters.items()
               if p.kind is p.KEYWORD_ONLY} - {"g"}
        assert set(option_names(method)) == fixed | own
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['tol'\] for solver='anderson'"):
        check_options("anderson", {"tol": 1e-3})
    with pytest.raises(ValueError, match="damping"):
        check_options("anderson", {"damping": 2.0})
    check_options("picard", {"damping": 0.5, "per_sample": False})


def test_per_sample_is_a_layer_option():
    cell = TanhCell(3, 2)
    x = torch.randn(4, 2, dtype=torch.float64)
    for solver in ("ode", "anderson"):
        layer = contdeq.DEQ(cell, state_shape=3, solver=solver, per_sample=False)
        layer(x)
        assert layer.stats.forward.residual.shape == (1,)


@pytest.mark.parametrize("solver", ["ode", *FIXED_POINT_METHODS])
def test_solve_is_the_one_dispatch(solver):
    f, z0 = _contraction()
    z, stats = solve(solver, f, z0, atol=1e-9, rtol=0.0)
    if solver == "ode":
        z_ref, ref = steady_state(lambda t, z: f(z) - z, z0, atol=1e-9, rtol=0.0)
    else:
        z_ref, ref = fixed_point(f, z0, method=solver, atol=1e-9, rtol=0.0)
    assert torch.equal(z, z_ref) and stats.nfe == ref.nfe and stats.steps == ref.steps
    # tuple states (joint inference's): the ODE residual is taken per part
    zs, _ = solve(solver, lambda s: (f(s[0]), 0.5 * s[1]), (z0, torch.ones_like(z0)),
                  atol=1e-9, rtol=0.0)
    assert torch.allclose(zs[0], z_ref, atol=1e-7) and zs[1].abs().max() < 1e-6


def test_typed_solver_objects_carry_their_options():
    f, z0 = _contraction()
    fn = lambda t, z: f(z) - z  # noqa: E731
    for obj, kwargs in ((PTC(max_step=0.5, first_step=0.25), {"method": "ptc"}),
                        (RungeKutta("bosh3", max_step=0.5), {"method": "bosh3"})):
        z_obj, s_obj = steady_state(fn, z0, method=obj)
        extra = {"max_step": 0.5}
        if isinstance(obj, PTC):
            extra["first_step"] = 0.25
        z_str, s_str = steady_state(fn, z0, **kwargs, **extra)
        assert torch.equal(z_obj, z_str) and (s_obj.nfe, s_obj.steps) == (s_str.nfe, s_str.steps)
        assert s_obj.method == kwargs["method"]
    # the call's own keyword wins over the object's
    _, s_call = steady_state(fn, z0, method=PTC(max_step=0.5), max_step=1.0)
    _, s_default = steady_state(fn, z0, method="ptc")
    assert s_call.nfe == s_default.nfe
    with pytest.raises(ValueError, match="max_step"):
        PTC(max_step=0.0)
    with pytest.raises(ValueError, match="tableau must be one of"):
        RungeKutta("euler")


@pytest.mark.parametrize("tuple_state", [False, True])
def test_solvers_return_a_solution_that_unpacks(tuple_state):
    f, z0 = _contraction()
    state = (z0, z0[:, :1]) if tuple_state else z0
    fx = (lambda s: (f(s[0]), 0.5 * s[1])) if tuple_state else f
    for out in (solve("ode", fx, state), solve("picard", fx, state)):
        assert isinstance(out, Solution)
        z, stats = out
        assert z is out.z and stats is out.stats
        assert out.stop_reason == stats.stop_reason == "converged"
        assert torch.equal(out.converged, stats.converged)
    one = steady_state(lambda t, z: -z, torch.ones(3))  # unbatched: through solve_as_one_sample
    assert isinstance(one, Solution) and one.z.shape == (3,)


def test_implicit_ptc_object_passes_its_options_to_the_solve() -> None:
    """``ImplicitPTC(options=PTCOptions(...))`` changes the computation: a GMRES cap of one
    iteration per step takes more steps than the default on a stiff linear flow, and a
    non-PTCOptions value is refused naming the type."""
    from contdeq.solvers import ImplicitPTC, PTCOptions

    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    matrix = -(a @ a.T) - 0.5 * torch.eye(6, dtype=torch.float64)
    z0 = torch.randn(3, 6, dtype=torch.float64)

    def func(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ matrix.T + 1.0

    _, default = contdeq.solvers.steady_state(func, z0, method="implicit_ptc")
    _, capped = contdeq.solvers.steady_state(
        func, z0, method=ImplicitPTC(options=PTCOptions(max_linear_iterations=1)),
        on_nonconvergence="ignore")
    assert default.all_converged
    assert capped.linear_iterations != default.linear_iterations
    with pytest.raises(TypeError, match="PTCOptions"):
        ImplicitPTC(options={"restart": 5})
