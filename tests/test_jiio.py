"""Joint inference and input optimization (contdeq.jiio) against independent solutions.

The reference problem is a linear DEQ ``f(z, x) = W z + U x + b`` with a quadratic objective
``1/2 ||z - t||^2 + lam/2 ||x||^2``: then ``z*(x) = M x + m`` and the nested optimum, and the
optimal value as a function of ``(W, U, b)``, have closed forms (or, with constraints, come
from scipy.optimize on the nested problem).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import Tensor

from contdeq.implicit import ForwardSolver, backward_mode
from contdeq.jiio import (
    StepSizes,
    box,
    compose,
    joint_inference,
    l2_ball,
    linf_ball,
    nested_inference,
    optimal_objective,
)
from contdeq.solvers import ConvergenceError, ConvergenceWarning, NonFiniteError

DT = torch.float64
N, M, B = 6, 3, 4
LAM = 0.5


class LinearProblem:
    """The linear DEQ and quadratic objective above, with closed-form answers."""

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(N, N, generator=gen, dtype=DT)
        self.w = 0.6 * w / torch.linalg.matrix_norm(w, 2)
        self.u = torch.randn(N, M, generator=gen, dtype=DT)
        self.b = torch.randn(N, generator=gen, dtype=DT)
        self.t = torch.randn(B, N, generator=gen, dtype=DT)

    def f(self, z: Tensor, x: Tensor) -> Tensor:
        return z @ self.w.T + x @ self.u.T + self.b

    def objective(self, z: Tensor, x: Tensor) -> Tensor:
        return 0.5 * ((z - self.t) ** 2).sum(1) + 0.5 * LAM * (x**2).sum(1)

    def affine(self, w: Tensor, u: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """``z*(x) = x @ M^T + m`` for the parameters ``(w, u, b)``."""
        a = torch.eye(N, dtype=DT) - w
        return torch.linalg.solve(a, u), torch.linalg.solve(a, b)

    def hessian(self) -> Tensor:
        mat, _ = self.affine(self.w, self.u, self.b)
        return mat.T @ mat + LAM * torch.eye(M, dtype=DT)

    def optimum(self, w: Tensor, u: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Unconstrained ``(x*, z*, V)`` with ``V = min_x L`` per sample, differentiable."""
        mat, vec = self.affine(w, u, b)
        h = mat.T @ mat + LAM * torch.eye(M, dtype=DT)
        x = -torch.linalg.solve(h, mat.T @ (vec - self.t).T).T
        z = x @ mat.T + vec
        return x, z, self.objective(z, x)

    def alpha(self) -> float:
        """The classical gradient step ``1 / lambda_max`` of the nested problem."""
        return 1.0 / float(torch.linalg.eigvalsh(self.hessian()).max())

    def nested_scipy(self, bounds: list[tuple[float, float]] | None, sample: int,
                     constraint: dict | None = None) -> np.ndarray:
        """One sample's constrained nested optimum by scipy (L-BFGS-B or SLSQP)."""
        mat, vec = (a.numpy() for a in self.affine(self.w, self.u, self.b))
        t = self.t[sample].numpy()

        def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
            r = mat @ x + vec - t
            return 0.5 * r @ r + 0.5 * LAM * x @ x, mat.T @ r + LAM * x

        method = "SLSQP" if constraint else "L-BFGS-B"
        result = minimize(fun, np.zeros(M), jac=True, method=method, bounds=bounds,
                          constraints=[constraint] if constraint else (),
                          options={"ftol": 1e-14} if constraint else {"gtol": 1e-12})
        return result.x


@pytest.fixture
def problem() -> LinearProblem:
    return LinearProblem()


def solve(problem: LinearProblem, **kwargs: object) -> tuple[Tensor, Tensor, object]:
    options = {"step_sizes": problem.alpha(), "atol": 1e-10, "rtol": 0.0, "max_steps": 2000,
               **kwargs}
    return joint_inference(problem.f, problem.objective, torch.zeros(B, M, dtype=DT),
                           torch.zeros(B, N, dtype=DT), **options)


@pytest.mark.parametrize("solver, alpha_scale, options", [
    ("anderson", 1.0, {}),
    ("picard", 0.25, {}),  # undamped Picard on the augmented map needs a shorter x step
    ("ode", 1.0, {"atol": 1e-6, "max_steps": 3000}),
    ("ode", 1.0, {"method": "implicit_ptc"}),  # the map's true Jacobian (second derivatives)
    ("newton", 1.0, {}),
])
def test_joint_solution_matches_the_closed_form(problem: LinearProblem, solver: str,
                                                alpha_scale: float, options: dict) -> None:
    """Catches a wrong adjoint or input update (sign, transpose, missing dL/dx term): the
    augmented fixed point would not be the nested optimum."""
    z, x, stats = solve(problem, solver=solver, step_sizes=alpha_scale * problem.alpha(),
                        **options)
    x_ref, z_ref, value = problem.optimum(problem.w, problem.u, problem.b)
    tol = 1e-4 if options.get("atol") == 1e-6 else 1e-8
    torch.testing.assert_close(x, x_ref, atol=tol, rtol=0)
    torch.testing.assert_close(z, z_ref, atol=tol, rtol=0)
    torch.testing.assert_close(stats.objective, value, atol=tol, rtol=0)
    assert stats.all_converged
    assert float(stats.residual_z.max()) < 10 * tol
    assert float(stats.residual_x.max()) < 10 * tol
    # mu* solves the adjoint equation (I - W)^T mu = z* - t
    mu_ref = torch.linalg.solve(torch.eye(N, dtype=DT) - problem.w.T, (z_ref - problem.t).T).T
    torch.testing.assert_close(stats.adjoint, mu_ref, atol=100 * tol, rtol=0)


def test_stats_count_every_call_of_f(problem: LinearProblem) -> None:
    """Catches miscounted calls: every augmented step is one f call and one VJP, plus the
    final evaluation; the callback sees every step."""
    calls = {"f": 0, "callback": 0}

    def f(z: Tensor, x: Tensor) -> Tensor:
        calls["f"] += 1
        return problem.f(z, x)

    def callback(z: Tensor, x: Tensor) -> None:
        calls["callback"] += 1
        assert not z.requires_grad and not x.requires_grad

    _, _, stats = joint_inference(f, problem.objective, torch.zeros(B, M, dtype=DT),
                                  torch.zeros(B, N, dtype=DT), step_sizes=problem.alpha(),
                                  callback=callback)
    assert stats.f_calls == calls["f"] == stats.solver.nfe + 1
    assert stats.vjps == stats.f_calls
    assert calls["callback"] == stats.solver.nfe


@pytest.mark.slow
def test_anderson_needs_far_fewer_f_calls_than_the_nested_loop(problem: LinearProblem) -> None:
    """Catches a joint solve that is no better than the naive loop it replaces (same step
    size, same final accuracy on x)."""
    _, x_joint, joint = solve(problem, atol=1e-8)
    x_ref, _, _ = problem.optimum(problem.w, problem.u, problem.b)
    _, x_nested, nested = nested_inference(
        problem.f, problem.objective, torch.zeros(B, M, dtype=DT), torch.zeros(B, N, dtype=DT),
        steps=40, step_size=problem.alpha(), solver=ForwardSolver("anderson", atol=1e-8),
    )
    assert float((x_joint - x_ref).abs().max()) < float((x_nested - x_ref).abs().max())
    assert 5 * joint.f_calls < nested.f_calls + nested.vjps


def test_nested_unrolled_and_implicit_take_the_same_steps(problem: LinearProblem) -> None:
    """Catches a nested baseline whose two gradient modes disagree (a wrong implicit or
    unrolled gradient would make the comparison in benchmarks/jiio.py meaningless)."""
    x0, z0 = torch.zeros(B, M, dtype=DT), torch.zeros(B, N, dtype=DT)
    runs = [nested_inference(problem.f, problem.objective, x0, z0, steps=5,
                             step_size=problem.alpha(),
                             backward=backward_mode(mode, rtol=1e-11, max_steps=500),
                             solver=ForwardSolver("picard", atol=1e-11, rtol=0, max_steps=500))
            for mode in ("implicit", "unrolled")]
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-8, rtol=0)
    assert runs[1][2].vjps > runs[0][2].vjps  # unrolled: one VJP per recorded forward step


def test_linf_ball_and_box_constraints_match_scipy(problem: LinearProblem) -> None:
    """Catches a projection applied wrongly (or not at all) inside the augmented map: the
    constrained optimum (an L∞ ball around a reference, intersected with a box) must equal
    L-BFGS-B's on the nested problem, and be feasible."""
    center = torch.full((B, M), 0.3, dtype=DT)
    eps, lo, hi = 0.4, -0.05, 10.0
    project = compose(linf_ball(center, eps), box(lo, hi))
    _, x, stats = solve(problem, project=project)
    assert bool(((x - center).abs() <= eps + 1e-12).all()) and bool((x >= lo).all())
    for sample in range(B):
        bounds = [(max(0.3 - eps, lo), min(0.3 + eps, hi))] * M
        np.testing.assert_allclose(x[sample].numpy(), problem.nested_scipy(bounds, sample),
                                   atol=1e-6)
    assert stats.all_converged
    x_free, _, _ = problem.optimum(problem.w, problem.u, problem.b)
    assert float((x_free - x).abs().max()) > 0.1  # the constraint is active


def test_l2_ball_constraint_matches_scipy(problem: LinearProblem) -> None:
    """Catches a wrong L2 projection (per-sample norm, radius scaling) in a constrained
    solve: compared with SLSQP on the nested problem."""
    eps = 0.3
    _, x, _ = solve(problem, project=l2_ball(torch.zeros(B, M, dtype=DT), eps))
    assert bool((torch.linalg.vector_norm(x, dim=1) <= eps + 1e-12).all())
    for sample in range(B):
        ball = {"type": "ineq", "fun": lambda v: eps**2 - v @ v, "jac": lambda v: -2 * v}
        np.testing.assert_allclose(x[sample].numpy(), problem.nested_scipy(None, sample, ball),
                                   atol=1e-5)


def test_projections_are_nearest_points() -> None:
    """Catches projections that move feasible points or overshoot: inside points stay, the
    others land on the boundary along the right direction."""
    center = torch.zeros(3, 4, dtype=DT)
    x = torch.tensor([[0.1, -0.2, 0.0, 0.05], [2.0, -3.0, 0.5, 0.0], [0.0, 0.0, 0.0, 4.0]],
                     dtype=DT)
    linf = linf_ball(center, 0.5)(x)
    torch.testing.assert_close(linf[0], x[0])
    torch.testing.assert_close(linf[1], torch.tensor([0.5, -0.5, 0.5, 0.0], dtype=DT))
    l2 = l2_ball(center, torch.tensor([1.0, 1.0, 2.0], dtype=DT))(x)
    torch.testing.assert_close(l2[0], x[0])
    torch.testing.assert_close(l2[1], x[1] / torch.linalg.vector_norm(x[1]))
    torch.testing.assert_close(l2[2], torch.tensor([0.0, 0.0, 0.0, 2.0], dtype=DT))
    clamped = box(0.0, 1.0)(x)
    assert float(clamped.min()) == 0.0 and float(clamped.max()) == 1.0
    torch.testing.assert_close(clamped[0], torch.tensor([0.1, 0.0, 0.0, 0.05], dtype=DT))


def test_outer_gradient_equals_the_gradient_of_the_nested_optimum(problem: LinearProblem
                                                                  ) -> None:
    """Catches a wrong training gradient: optimal_objective's gradient in (W, U, b) must equal
    the gradient of the closed-form optimal value min_x L(z*(x; W, U, b), x), which includes
    how x* moves with the parameters."""
    params = [p.clone().requires_grad_(True) for p in (problem.w, problem.u, problem.b)]
    _, _, value = problem.optimum(*params)
    expected = torch.autograd.grad(value.sum(), params)

    def f(z: Tensor, x: Tensor) -> Tensor:
        return z @ params[0].T + x @ params[1].T + params[2]

    with torch.no_grad():
        z, x, stats = joint_inference(f, problem.objective, torch.zeros(B, M, dtype=DT),
                                      torch.zeros(B, N, dtype=DT), step_sizes=problem.alpha(),
                                      atol=1e-11, rtol=0, max_steps=2000)
    loss = optimal_objective(f, problem.objective, z, x, stats.adjoint)
    torch.testing.assert_close(loss.detach(), value.detach(), atol=1e-9, rtol=0)
    got = torch.autograd.grad(loss.sum(), params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-7, rtol=1e-7)


def test_outer_gradient_passes_gradcheck() -> None:
    """Catches an outer gradient that differs from finite differences of the optimal value
    computed by joint inference itself (float64 gradcheck through a nonlinear DEQ and an
    objective with its own parameter)."""
    gen = torch.Generator().manual_seed(1)
    w0 = 0.3 * torch.randn(4, 4, generator=gen, dtype=DT)
    u0 = torch.randn(4, 2, generator=gen, dtype=DT)
    target = torch.randn(2, 4, generator=gen, dtype=DT)

    def value(w: Tensor, u: Tensor, scale: Tensor) -> Tensor:
        def f(z: Tensor, x: Tensor) -> Tensor:
            return torch.tanh(z @ w.T + x @ u.T)

        def objective(z: Tensor, x: Tensor) -> Tensor:
            return 0.5 * ((scale * z - target) ** 2).sum(1) + 0.5 * (x**2).sum(1)

        with torch.no_grad():
            z, x, stats = joint_inference(f, objective, torch.zeros(2, 2, dtype=DT),
                                          torch.zeros(2, 4, dtype=DT), step_sizes=0.3,
                                          atol=1e-12, rtol=0, max_steps=3000)
        return optimal_objective(f, objective, z, x, stats.adjoint)

    inputs = (w0.requires_grad_(True), u0.requires_grad_(True),
              torch.tensor(1.3, dtype=DT, requires_grad=True))
    # fast mode: one random direction, two solves instead of two per input entry
    assert torch.autograd.gradcheck(value, inputs, eps=1e-6, atol=1e-6, rtol=1e-5,
                                    fast_mode=True)


def test_bad_objective_and_projection_are_named(problem: LinearProblem) -> None:
    """Catches silent acceptance of an objective reduced over the batch, one without a
    gradient, and a projection that changes the shape."""
    x0, z0 = torch.zeros(B, M, dtype=DT), torch.zeros(B, N, dtype=DT)
    with pytest.raises(ValueError, match=r"objective\(z, x\) must return one value per sample"):
        joint_inference(problem.f, lambda z, x: problem.objective(z, x).mean(), x0, z0)
    with pytest.raises(ValueError, match="must be differentiable in z or x"):
        joint_inference(problem.f, lambda z, x: problem.objective(z, x).detach(), x0, z0)
    with pytest.raises(ValueError, match=r"project\(x\) must return a tensor shaped like x0"):
        joint_inference(problem.f, problem.objective, x0, z0, project=lambda x: x[:, :2])
    with pytest.raises(RuntimeError, match="pass z0 when the state is not shaped like x0"):
        joint_inference(problem.f, problem.objective, x0)  # z0 defaults to x0's shape
    with pytest.raises(ValueError, match=r"f\(z, x\) must return a tensor shaped like z0"):
        joint_inference(lambda z, x: problem.f(z, x)[:, :2], problem.objective, x0, z0)
    with pytest.raises(ValueError, match="solver must be one of"):
        joint_inference(problem.f, problem.objective, x0, z0, solver="secant")
    with pytest.raises(ValueError, match=r"step_sizes.z must be in \(0, 1\]"):
        joint_inference(problem.f, problem.objective, x0, z0, step_sizes=StepSizes(z=1.5))
    with pytest.raises(ValueError, match=r"x0 must be \(B, \.\.\.\) .* x0\[:, None\]"):
        joint_inference(problem.f, problem.objective, torch.zeros(B, dtype=DT), z0)
    with pytest.raises(ValueError, match="x0 contains NaN"):
        joint_inference(problem.f, problem.objective, torch.full((B, M), math.nan, dtype=DT),
                        z0)
    with pytest.raises(ValueError, match="eps must be"):
        linf_ball(x0, -1.0)
    # a (B,) radius of the right shape with a value <= 0 says so, not only its (right) shape
    with pytest.raises(ValueError, match=rf"got shape \({B},\), smallest value -0.1"):
        l2_ball(x0, torch.tensor([0.1, -0.1] + [0.2] * (B - 2)))


def test_non_finite_values_raise(problem: LinearProblem) -> None:
    """Catches NaN/Inf from f or the objective propagating silently into z* and x*."""
    x0, z0 = torch.zeros(B, M, dtype=DT), torch.zeros(B, N, dtype=DT)
    with pytest.raises(NonFiniteError, match="joint_inference"):
        joint_inference(lambda z, x: problem.f(z, x) * math.inf, problem.objective, x0, z0)


def test_nonconvergence_is_reported_as_for_the_solvers(problem: LinearProblem) -> None:
    """Catches a non-converged joint solve returned silently."""
    x0, z0 = torch.zeros(B, M, dtype=DT), torch.zeros(B, N, dtype=DT)
    with pytest.warns(ConvergenceWarning, match="joint_inference"):
        _, _, stats = joint_inference(problem.f, problem.objective, x0, z0, max_steps=3)
    assert not stats.all_converged and stats.solver.stop_reason == "max_steps"
    with pytest.raises(ConvergenceError) as info:
        joint_inference(problem.f, problem.objective, x0, z0, max_steps=3,
                        on_nonconvergence="raise")
    assert info.value.stats.steps == 3


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_stopping_test_is_on_the_gradient_whatever_the_step(problem: LinearProblem,
                                                            scale: float) -> None:
    """Catches a stopping test scaled by the input step: at the default tolerances the true
    gradient of the nested objective at the returned input must be within ``gtol`` for a
    long and a 10x shorter step (a test on ``alpha * g`` passes the short one at a 10x larger
    gradient)."""
    x0, z0 = torch.zeros(B, M, dtype=DT), torch.zeros(B, N, dtype=DT)
    _, x, stats = joint_inference(problem.f, problem.objective, x0, z0, max_steps=5000,
                                  step_sizes=scale * problem.alpha(), gtol=1e-5)
    assert stats.all_converged
    mat, vec = problem.affine(problem.w, problem.u, problem.b)
    gradient = (x @ mat.T + vec - problem.t) @ mat + LAM * x
    rms = gradient.pow(2).mean(1).sqrt()
    assert float(rms.max()) <= 1.01e-5
    assert float(stats.residual_x.max()) <= 1e-5


def test_original_step_schedule_switches_at_its_step(problem: LinearProblem) -> None:
    """Catches a schedule that is ignored or switches at the wrong step: the iterates equal
    the constant-step run's before the switch and differ from the step after it."""
    x0, z0 = torch.zeros(B, M, dtype=DT), torch.zeros(B, N, dtype=DT)
    steps = StepSizes.original(problem.alpha(), 0.1 * problem.alpha())
    assert (steps.z, steps.adjoint) == (0.8, 0.6)
    assert steps.x_at(49, 60) == steps.x and steps.x_at(50, 60) == steps.x_late
    assert steps.x_at(99, 160) == steps.x and steps.x_at(100, 160) == steps.x_late
    runs = []
    for schedule in (StepSizes(x=problem.alpha(), z=0.8, adjoint=0.6),
                     dataclasses.replace(steps, switch_step=4)):
        xs: list[Tensor] = []
        joint_inference(problem.f, problem.objective, x0, z0, solver="picard",
                        step_sizes=schedule, max_steps=6, on_nonconvergence="ignore",
                        callback=lambda z, x, xs=xs: xs.append(x))
        runs.append(xs)
    for i in range(4):
        torch.testing.assert_close(runs[0][i], runs[1][i], atol=0, rtol=0)
    assert not torch.allclose(runs[0][4], runs[1][4])


def test_selection_rules() -> None:
    """Catches a selection that keeps a worse point: ``"residual"`` keeps the smallest ratio;
    ``"objective"`` (the original's) takes every point during its first 10, then a lower
    objective within 1.3x of the lowest ratio, never a failing point over a passing one."""
    from contdeq.jiio.joint import _Selection

    def offer(sel: _Selection, step: float, ratio: float, value: float) -> None:
        sel.offer((torch.full((1, 1), step),) * 3, torch.tensor([ratio]),
                  torch.tensor([value]))

    chosen = {}
    for rule in ("residual", "objective"):
        sel = _Selection(rule)
        for step in range(10):
            offer(sel, step, 5.0 - 0.1 * step, 1.0)  # every point taken by "objective"
        offer(sel, 10, 4.0, 1.0)  # smaller ratio: both take it
        offer(sel, 11, 5.0, 0.5)  # lower objective at 1.25x the lowest: "objective" only
        offer(sel, 12, 6.0, 0.1)  # 1.5x the lowest: neither
        chosen[rule] = float(sel.state[0])
    assert chosen == {"residual": 10.0, "objective": 11.0}
    sel = _Selection("objective")
    for step in range(10):
        offer(sel, step, 2.0, 1.0)
    offer(sel, 10, 0.9, 1.0)  # passes
    offer(sel, 11, 1.1, 0.5)  # lower objective, within 1.3x, but fails: not taken
    assert float(sel.state[0]) == 10.0 and bool(sel.converged.all())


def test_select_and_bad_tolerances_are_checked(problem: LinearProblem) -> None:
    """Catches an unknown selection rule, a zero gradient tolerance or a negative late step
    accepted silently."""
    x0, z0 = torch.zeros(B, M, dtype=DT), torch.zeros(B, N, dtype=DT)
    with pytest.raises(ValueError, match="select must be one of"):
        joint_inference(problem.f, problem.objective, x0, z0, select="last")
    with pytest.raises(ValueError, match="gtol must be > 0"):
        joint_inference(problem.f, problem.objective, x0, z0, atol=0.0)
    with pytest.raises(ValueError, match=r"step_sizes\.x_late"):
        StepSizes(x_late=-1.0)
    with pytest.raises(ValueError, match=r"switch_step needs x_late"):  # was ignored
        StepSizes(x=0.1, switch_step=10)


def test_a_zero_tolerance_at_a_zero_start_is_not_nan(problem: LinearProblem) -> None:
    """Catches 0 / 0 in the stopping test: with ``atol=0`` a cell without bias started at
    ``z = x = 0`` has residual 0 over tolerance 0 there; the NaN ratio made the selection keep
    that first point for every sample (``NaN < lowest`` never holds) and never stop."""
    problem.b.zero_()
    _, x, stats = solve(problem, atol=0.0, rtol=1e-9, gtol=1e-9)
    assert stats.all_converged and bool(torch.isfinite(stats.solver.residual).all())
    x_opt, _, _ = problem.optimum(problem.w, problem.u, problem.b)
    torch.testing.assert_close(x, x_opt, atol=1e-7, rtol=0)


def _tanh_problem(seed: int) -> tuple[object, object]:
    """A small non-convex problem: a tanh DEQ, targets inside its range, a weak prior."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, N, generator=gen, dtype=DT)
    w = 0.6 * w / torch.linalg.matrix_norm(w, 2)
    u = torch.randn(N, M, generator=gen, dtype=DT)
    b = torch.randn(N, generator=gen, dtype=DT)
    t = 0.9 * torch.tanh(torch.randn(B, N, generator=gen, dtype=DT))

    def f(z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(z @ w.T + x @ u.T + b)

    def objective(z: Tensor, x: Tensor) -> Tensor:
        return 0.5 * ((z - t) ** 2).sum(1) + 0.025 * (x**2).sum(1)

    return f, objective


@pytest.mark.slow
def test_anderson_stalls_where_the_input_step_is_expansive_and_may_stop_at_saddles() -> None:
    """Documents (docs/jiio.md) how Anderson behaves on a small non-convex problem (a tanh DEQ,
    4 problems of 4 samples): it is a root finder on the augmented map, whose input block is
    locally ``I - alpha H`` (``H`` the nested objective's Hessian). Every sample it leaves
    unconverged sits where that block is expansive (``H`` indefinite, or
    ``alpha lambda_max(H) > 2``), and some samples it reports converged are saddle points of
    the nested objective (zero gradient, ``H`` indefinite), not minima. Fails if a stall
    happens where the map contracts (a solver bug, not the problem's geometry)."""
    alpha, stalled, saddles = 0.5, 0, 0
    for seed in range(4):
        f, objective = _tanh_problem(seed)
        _, x, stats = joint_inference(f, objective, torch.zeros(B, M, dtype=DT),
                                      torch.zeros(B, N, dtype=DT), step_sizes=alpha,
                                      max_steps=500, on_nonconvergence="ignore")
        for i in range(B):
            def nested(xi: Tensor, f: object = f, objective: object = objective) -> Tensor:
                z = torch.zeros(1, N, dtype=DT)
                for _ in range(200):
                    z = f(z, xi)
                return objective(z, xi).sum()

            hessian = torch.autograd.functional.hessian(nested, x[i:i + 1]).reshape(M, M)
            radius = float(torch.linalg.eigvals(
                torch.eye(M, dtype=DT) - alpha * hessian).abs().max())
            if bool(stats.solver.converged[i]):
                saddles += int(float(torch.linalg.eigvalsh(hessian).min()) < 0)
            else:
                stalled += 1
                assert radius > 1.0
    assert stalled > 0 and saddles > 0  # the problem reproduces both
