"""``joint_inference``: a DEQ's equilibrium, its adjoint and an optimized input, solved together
as one augmented equilibrium (JIIO: Gurumurthy, Bai, Manchester and Kolter, NeurIPS 2021).

For ``min_x L(z*(x), x)`` subject to ``x`` in a set ``C`` (its projection ``P``), where
``z*(x) = f(z*, x)``, the optimality conditions are a fixed point of the map, per sample::

    z  <- z + beta_z  (f(z, x) - z)                                   the DEQ
    mu <- mu + beta_mu (dL/dz + (df/dz)^T mu - mu)                    its adjoint
    x  <- P(x - alpha (dL/dx + (df/dx)^T mu))                        a projected gradient step

At its fixed point ``z = z*(x)``, ``mu = (I - df/dz)^-T dL/dz`` and ``x`` is a stationary point
of the projected gradient of ``L(z*(x), x)``: the nested problem's solution, found without a
DEQ solve and an implicit backward per gradient step. One evaluation of the map costs one call
of ``f`` and one vector-Jacobian product (the objective's gradient rides along). The map is
iterated by Anderson (or Broyden, Picard) through :func:`~contdeq.solvers.fixed_point`, or
its continuous version ``d(z, mu, x)/dt = map(z, mu, x) - (z, mu, x)`` is integrated to steady
state by :func:`~contdeq.solvers.steady_state` (``solver="ode"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..solvers import (
    FIXED_POINT_METHODS,
    NonFiniteError,
    OnNonConvergence,
    SolverStats,
    StepInfo,
    Stop,
    report_nonconvergence,
    sample_rms,
    solve,
)
from ..solvers.validation import (
    check_callable,
    check_choice,
    check_func_output,
    check_positive_float,
    check_positive_int,
    check_state,
    check_tolerances,
)
from .projections import Projection

__all__ = ["JIIO_SOLVERS", "JIIOStats", "StepSizes", "joint_inference", "optimal_objective"]

#: Solvers of :func:`joint_inference`: the discrete fixed-point methods, or ``"ode"``.
JIIO_SOLVERS = (*FIXED_POINT_METHODS, "ode")

Objective = Callable[[Tensor, Tensor], Tensor]
#: Anderson's default memory and damping on the augmented state. The input block converges
#: like gradient descent, which a longer history accelerates most; undamped mixing stalls on
#: the latent tasks of ``benchmarks/jiio.py`` (memory 5 or 20, damping 1: the nested loop's
#: objective missed within 300 augmented steps on some task of every tuning run; memory 20,
#: damping 0.5: reached on all three in 45-100 steps).
ANDERSON_MEMORY = 20
ANDERSON_DAMPING = 0.5


@dataclass(frozen=True)
class StepSizes:
    """Step sizes of the augmented map, and the input step's schedule.

    Attributes:
        x: ``alpha``, the gradient step on the input (what plain projected gradient descent
            on ``L(z*(x), x)`` would use).
        z: ``beta_z`` in ``(0, 1]``, damping of the DEQ update (1: ``z <- f(z, x)``).
        adjoint: ``beta_mu`` in ``(0, 1]``, damping of the adjoint update.
        x_late: the input step after ``switch_step`` augmented steps (``None``: ``x``
            throughout). The original code (locuslab/JIIO-DEQ) switches from a larger to a
            smaller step.
        switch_step: the step at which ``x_late`` takes over; ``None``: the original's
            ``max(50, 5 * max_steps // 8)``.
    """

    x: float = 0.1
    z: float = 1.0
    adjoint: float = 1.0
    x_late: float | None = None
    switch_step: int | None = None

    def __post_init__(self) -> None:
        check_positive_float(self.x, "step_sizes.x")
        if self.x_late is not None:
            check_positive_float(self.x_late, "step_sizes.x_late")
        if self.switch_step is not None:
            check_positive_int(self.switch_step, "step_sizes.switch_step")
            if self.x_late is None:
                raise ValueError("step_sizes.switch_step needs x_late, the step it switches "
                                 "to (with x_late=None the input step stays x throughout)")
        for name in ("z", "adjoint"):
            value = check_positive_float(getattr(self, name), f"step_sizes.{name}")
            if value > 1.0:
                raise ValueError(f"step_sizes.{name} must be in (0, 1], got {value}")

    @classmethod
    def original(cls, x: float, x_late: float | None = None) -> StepSizes:
        """The original code's dampings (``beta_z = 0.8``, ``beta_mu = 0.6``), with the input
        step ``x`` switching to ``x_late`` after ``max(50, 5 * max_steps // 8)`` steps."""
        return cls(x=x, z=0.8, adjoint=0.6, x_late=x_late)

    def x_at(self, step: int, max_steps: int) -> float:
        """The input step used by augmented step ``step`` (0-based) of a ``max_steps`` solve."""
        if self.x_late is None:
            return self.x
        switch = max(50, 5 * max_steps // 8) if self.switch_step is None else self.switch_step
        return self.x if step < switch else self.x_late


@dataclass
class JIIOStats:
    """What :func:`joint_inference` did, and where it stopped.

    Attributes:
        solver: statistics of the augmented solve (its ``nfe`` counts augmented steps). Its
            ``residual`` is, per sample, the largest of the three block residuals below
            divided by its tolerance (``converged``: at most 1) and its ``tolerance`` is 1.
        f_calls: calls of ``f``, including the final evaluation at the returned point.
        vjps: vector-Jacobian products (one per augmented step, through ``f`` and the
            objective together), including the final evaluation.
        objective: ``(B,)`` the objective at the returned ``(z*, x*)``.
        residual_z: ``(B,)`` ``rms(f(z*, x*) - z*)``.
        residual_adjoint: ``(B,)`` ``rms(dL/dz + (df/dz)^T mu - mu)`` at the returned point.
        residual_x: ``(B,)`` ``rms((x* - P(x* - alpha g)) / alpha)``, the projected gradient
            (gradient mapping) of the objective: ``rms(g)`` without a projection, whatever
            ``alpha`` (``g = dL/dx + (df/dx)^T mu``; 0 at a constrained stationary point).
        adjoint: ``(B, ...)`` ``mu*``, shaped like ``z*``; :func:`optimal_objective` uses it.
    """

    solver: SolverStats
    f_calls: int
    vjps: int
    objective: Tensor
    residual_z: Tensor
    residual_adjoint: Tensor
    residual_x: Tensor
    adjoint: Tensor

    @property
    def all_converged(self) -> bool:
        """True when every sample met its three tolerances."""
        return self.solver.all_converged

    def summary(self) -> str:
        """One line: the solve, the calls, the objective and the largest block residuals."""
        return (f"{self.solver.summary()}; f calls {self.f_calls}, VJPs {self.vjps}, "
                f"objective mean {float(self.objective.mean()):.4g}, max residual "
                f"z {float(self.residual_z.max()):.3g}, adjoint "
                f"{float(self.residual_adjoint.max()):.3g}, x {float(self.residual_x.max()):.3g}")


#: Ways to choose the returned iterate of each sample: the smallest residual, or the
#: original code's trade-off with the objective (see :func:`joint_inference`).
SELECT_CHOICES = ("residual", "objective")
#: The original's rule: every iterate is taken during the first steps, then a lower objective
#: is preferred when its residual is within this factor of the lowest seen.
_ORIGINAL_WARMUP = 10
_ORIGINAL_SLACK = 1.3


@dataclass
class _Tolerances:
    """The stopping test of each block: ``rms(f(z) - z) <= atol + rtol rms(z)``, the same for
    the adjoint, and ``rms(gradient mapping) <= gtol``."""

    atol: float
    rtol: float
    gtol: float


class _Selection:
    """Each sample's chosen iterate among the points where the map was evaluated, and whether
    a point that passed the stopping test was seen."""

    def __init__(self, select: str) -> None:
        self.select = select
        self.state: tuple[Tensor, Tensor, Tensor] | None = None
        self.ratio: Tensor | None = None  # (B,) of the chosen point
        self.lowest: Tensor | None = None  # (B,) lowest ratio seen
        self.value: Tensor | None = None  # (B,) objective at the chosen point
        self.converged: Tensor | None = None  # (B,) some point passed
        self.steps = 0

    def offer(self, state: tuple[Tensor, Tensor, Tensor], ratio: Tensor, value: Tensor) -> None:
        """Consider the point ``state`` with its residual ``ratio`` and objective ``value``."""
        passed = ratio <= 1.0
        if self.state is None:
            self.state, self.ratio, self.lowest, self.value = state, ratio, ratio, value
            self.converged = passed
            self.steps = 1
            return
        assert self.ratio is not None and self.lowest is not None and self.value is not None
        better = ratio < self.lowest
        if self.select == "objective":
            lower = (value < self.value) & (ratio < _ORIGINAL_SLACK * self.lowest)
            keep_converged = passed | (self.ratio > 1.0)
            take = better | (lower & keep_converged)
            if self.steps < _ORIGINAL_WARMUP:
                take = torch.ones_like(take)
        else:
            take = better
        self.state = tuple(torch.where(take.reshape(-1, *([1] * (new.ndim - 1))), new, old)
                           for new, old in zip(state, self.state, strict=True))
        self.ratio = torch.where(take, ratio, self.ratio)
        self.value = torch.where(take, value, self.value)
        self.lowest = torch.minimum(self.lowest, ratio)
        self.converged = self.converged | passed
        self.steps += 1


class _AugmentedMap:
    """The augmented map on ``(z, x, mu)``; counts calls of ``f`` and VJPs, checks outputs,
    and offers every evaluated point to the selection with its stopping-test ratio.

    With ``differentiable=True`` the map keeps its graph when its input requires grad
    (second derivatives of ``f``), so that Newton-Krylov solvers get its true Jacobian."""

    def __init__(self, f: Callable[[Tensor, Tensor], Tensor], objective: Objective,
                 project: Projection, steps: StepSizes, max_steps: int, tolerances: _Tolerances,
                 selection: _Selection, callback: Callable[[Tensor, Tensor], None] | None,
                 differentiable: bool = False) -> None:
        self.f = f
        self.objective = objective
        self.project = project
        self.steps = steps
        self.max_steps = max_steps
        self.tolerances = tolerances
        self.selection = selection
        self.callback = callback
        self.differentiable = differentiable
        self.f_calls = 0
        self.vjps = 0
        self.checked = False

    @property
    def alpha(self) -> float:
        """The input step of the next evaluation (the schedule counts evaluations: the
        ``k``-th, 0-based, is augmented step ``k``)."""
        return self.steps.x_at(self.f_calls, self.max_steps)

    def gradients(self, z: Tensor, x: Tensor, mu: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``f(z, x)``, ``L(z, x)`` ``(B,)`` and ``dL/d(z, x) + mu^T df/d(z, x)``."""
        keep = self.differentiable and torch.is_grad_enabled() and (
            z.requires_grad or x.requires_grad or mu.requires_grad)
        with torch.enable_grad():
            zr = z if keep and z.requires_grad else z.detach().requires_grad_(True)
            xr = x if keep and x.requires_grad else x.detach().requires_grad_(True)
            fz = self._call_f(zr, xr)
            self.f_calls += 1
            value = self.objective(zr, xr)
            if not self.checked:
                self._check(fz, value, zr)
            outputs, cotangents = [value], [torch.ones_like(value)]
            if fz.requires_grad:
                outputs.append(fz)
                cotangents.append(mu if keep else mu.detach())
            gz, gx = torch.autograd.grad(outputs, (zr, xr), cotangents, allow_unused=True,
                                         create_graph=keep)
            self.vjps += 1
        gz = torch.zeros_like(z) if gz is None else gz
        gx = torch.zeros_like(x) if gx is None else gx
        if keep:
            return fz, value.detach(), gz, gx
        return fz.detach(), value.detach(), gz, gx

    def _call_f(self, z: Tensor, x: Tensor) -> Tensor:
        """``f(z, x)``; until the first step has passed its checks, a failure inside ``f`` is
        explained in terms of the shapes it was called with."""
        if self.checked:
            return self.f(z, x)
        try:
            return self.f(z, x)
        except RuntimeError as exc:
            raise RuntimeError(
                f"f(z, x) failed with z of shape {tuple(z.shape)} and x of shape "
                f"{tuple(x.shape)}; pass z0 when the state is not shaped like x0. The error "
                f"was: {exc}") from exc

    def _check(self, fz: object, value: object, z: Tensor) -> None:
        check_func_output(fz, z, "f(z, x)", state="z0",
                          shape_hint=" (pass z0 when the state is not shaped like x0)")
        if not isinstance(value, Tensor) or value.shape != (z.shape[0],):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"objective(z, x) must return one value per sample, shape (B,) = "
                             f"({z.shape[0]},), got {shape}")
        if not value.requires_grad:
            raise ValueError("objective(z, x) must be differentiable in z or x (its result "
                             "does not require grad: was it computed under no_grad, detached, "
                             "or from neither z nor x?)")

    def step_x(self, x: Tensor, gx: Tensor, alpha: float) -> Tensor:
        """``P(x - alpha g)``, the output checked at the first call."""
        out = self.project(x - alpha * gx)
        if not self.checked:
            check_func_output(out, x, "project(x)", state="x0")
            self.checked = True
        return out

    def residuals(self, z: Tensor, x: Tensor, mu: Tensor, fz: Tensor, gz: Tensor,
                  x_next: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(B,)`` each: ``rms(f(z) - z)``, the adjoint's residual, the gradient mapping."""
        return (sample_rms((fz - z).detach()), sample_rms((gz - mu).detach()),
                sample_rms((x - x_next).detach()) / alpha)

    def ratio(self, z: Tensor, mu: Tensor, res: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """``(B,)`` the largest block residual over its tolerance (passed: ``<= 1``). A
        tolerance of 0 (``atol=0`` at a zero state or adjoint) is raised to the dtype's
        smallest normal number, so a residual of exactly 0 passes (not 0 / 0 = NaN)."""
        tol = self.tolerances
        rz, rmu, rx = res
        tiny = torch.finfo(rz.dtype).tiny
        return torch.stack([
            rz / (tol.atol + tol.rtol * sample_rms(z.detach())).clamp_min(tiny),
            rmu / (tol.atol + tol.rtol * sample_rms(mu.detach())).clamp_min(tiny),
            rx / tol.gtol,
        ]).amax(0)

    def __call__(self, state: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        z, x, mu = state
        alpha = self.alpha
        fz, value, gz, gx = self.gradients(z, x, mu)
        z_next = z + self.steps.z * (fz - z)
        mu_next = mu + self.steps.adjoint * (gz - mu)
        x_next = self.step_x(x, gx, alpha)
        ratio = self.ratio(z, mu, self.residuals(z, x, mu, fz, gz, x_next, alpha))
        self.selection.offer((z.detach(), x.detach(), mu.detach()), ratio, value)
        if self.callback is not None:
            self.callback(z_next.detach(), x_next.detach())
        return z_next, x_next, mu_next


def _identity(x: Tensor) -> Tensor:
    return x


#: Solvers (fixed-point methods, or ``method`` of ``solver="ode"``) that need the augmented
#: map's Jacobian: the map is then evaluated with second derivatives of ``f``.
NEWTON_METHODS = ("newton", "implicit_ptc")


def joint_inference(
    f: Callable[[Tensor, Tensor], Tensor],
    objective: Objective,
    x0: Tensor,
    z0: Tensor | None = None,
    *,
    solver: str = "anderson",
    step_sizes: float | StepSizes = 0.1,
    project: Projection | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    gtol: float | None = None,
    max_steps: int = 500,
    select: str = "residual",
    on_nonconvergence: OnNonConvergence = "warn",
    timeout: float | None = None,
    callback: Callable[[Tensor, Tensor], None] | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor, JIIOStats]:
    """Solve ``min_x objective(z*(x), x)`` with ``z*(x) = f(z*, x)``, per sample, as one
    augmented equilibrium over ``(z, x, mu)`` (see :mod:`contdeq.jiio`).

    Samples must be independent (no batch statistics in ``f`` or the objective): each
    sample's gradient is taken from the sum of the per-sample objectives.

    A sample passes the stopping test at a point where ``rms(f(z, x) - z) <= atol + rtol
    rms(z)``, the adjoint's residual ``rms(dL/dz + (df/dz)^T mu - mu) <= atol + rtol rms(mu)``
    and the projected gradient ``rms((x - P(x - alpha g)) / alpha) <= gtol`` (the gradient
    ``rms(g)`` when there is no projection): a test on the objective's gradient that does not
    depend on the step sizes. The solve stops when every sample has passed; each returns the
    point ``select`` chose among those where the map was evaluated.

    Args:
        f: the DEQ's cell, ``f(z, x) -> z`` (a module or any callable), ``z`` ``(B, ...)``.
        objective: ``objective(z, x) -> (B,)``, differentiable in ``z`` or ``x``; minimized.
            (To maximize, return its negative.)
        x0: ``(B, ...)`` initial input (feasible, or it is projected at the first step).
        z0: ``(B, ...)`` initial state; default zeros shaped like ``x0``.
        solver: ``"anderson"`` (default), ``"broyden"``, ``"picard"``, ``"newton"`` (through
            :func:`~contdeq.solvers.fixed_point`) or ``"ode"``: the steady state of
            ``d(z, x, mu)/dt = map(z, x, mu) - (z, x, mu)`` by
            :func:`~contdeq.solvers.steady_state` (``method="implicit_ptc"`` for the stiff
            coupled flow). Newton-Krylov methods evaluate the map with second derivatives
            of ``f`` (their Jacobian-vector products are ``stats.solver.jvps``).
        step_sizes: the input's gradient step ``alpha`` (a float), or a :class:`StepSizes`
            with the dampings of the DEQ and adjoint updates and the step's schedule
            (:meth:`StepSizes.original`: the original code's).
        project: ``project(x) -> x`` onto the feasible inputs, ``(B, ...)``; e.g.
            :func:`~contdeq.jiio.linf_ball`, :func:`~contdeq.jiio.box`. Default: none.
        atol, rtol: tolerances of the DEQ's and the adjoint's residuals (RMS norms).
        gtol: tolerance of the projected gradient's RMS norm; default ``atol``.
        max_steps: limit on the solver's steps.
        select: the returned point of each sample: ``"residual"`` (default), the one with the
            smallest residual relative to the tolerances; ``"objective"``, the original
            code's choice: any point in the first 10 evaluations, later one with a smaller
            residual, or a lower objective at a residual within 1.3x of the smallest seen
            (never trading a point that passed for one that did not).
        on_nonconvergence: ``"ignore"``, ``"warn"`` (default) or ``"raise"``
            (:class:`~contdeq.solvers.ConvergenceError`), as for the solvers.
        timeout: wall-clock limit in seconds.
        callback: called as ``callback(z, x)`` (``(B, ...)`` each, detached) after every
            augmented step with the updated iterates, e.g. to record a trajectory.
        **options: options of the solver (anderson ``memory``, ``damping``: 20 and 0.5 here,
            not 5 and 1; ...; for
            ``"ode"`` the keywords of :func:`~contdeq.solvers.steady_state`, e.g.
            ``method="implicit_ptc"``).

    Returns:
        ``(z*, x*, stats)``: ``z*`` shaped like ``z0``, ``x*`` like ``x0`` (projected), both
        detached, and a :class:`JIIOStats` (the adjoint ``mu*`` is ``stats.adjoint``). To train
        ``f``'s parameters on the optimal objective, use :func:`optimal_objective`.

    Raises:
        ValueError, TypeError: bad arguments, or an objective, ``f`` or projection whose
            output has the wrong shape (the message names which).
        NonFiniteError: NaN or Inf appeared during the solve.
        ConvergenceError: not converged and ``on_nonconvergence="raise"``.
    """
    check_callable(f, "f", "f(z, x) -> z")
    check_callable(objective, "objective", "objective(z, x) -> (B,)")
    x0 = check_state(x0, "x0")
    z0 = torch.zeros_like(x0) if z0 is None else check_state(z0, "z0")
    for name, state in (("x0", x0), ("z0", z0)):
        if state.ndim == 1:  # the augmented solve needs a per-sample shape
            raise ValueError(f"{name} must be (B, ...) with a per-sample shape, got "
                             f"{tuple(state.shape)}; for one number per sample pass "
                             f"{name}[:, None] (f and objective then see (B, 1) tensors)")
    if z0.shape[0] != x0.shape[0] or z0.dtype != x0.dtype or z0.device != x0.device:
        raise ValueError(f"z0 must have x0's batch size, dtype and device ({x0.shape[0]}, "
                         f"{x0.dtype}, {x0.device}), got ({z0.shape[0]}, {z0.dtype}, "
                         f"{z0.device})")
    check_choice(solver, "solver", JIIO_SOLVERS)
    check_choice(select, "select", SELECT_CHOICES)
    check_tolerances(atol, rtol)
    gtol = atol if gtol is None else check_positive_float(gtol, "gtol")
    if gtol <= 0:
        raise ValueError("gtol must be > 0 (pass gtol when atol is 0)")
    check_positive_int(max_steps, "max_steps")
    if project is not None:
        check_callable(project, "project", "project(x) -> x")
    if callback is not None:
        check_callable(callback, "callback", "callback(z, x)")
    steps = step_sizes if isinstance(step_sizes, StepSizes) else StepSizes(x=step_sizes)
    method = options.get("method") if solver == "ode" else solver
    selection = _Selection(select)
    augmented = _AugmentedMap(f, objective, project or _identity, steps, max_steps,
                              _Tolerances(atol, rtol, gtol), selection, callback,
                              differentiable=method in NEWTON_METHODS)
    state0 = (z0.detach(), x0.detach(), torch.zeros_like(z0))
    if solver == "anderson":
        options = {"memory": ANDERSON_MEMORY, "damping": ANDERSON_DAMPING, **options}

    def stop_when_all_passed(info: StepInfo) -> Stop | None:
        assert selection.converged is not None
        return Stop() if bool(selection.converged.all()) else None

    # The joint test above stops the solve, through the step callback; the solver's own test
    # on the stacked residual never passes (its tolerance is below any float residual but 0),
    # except for Runge-Kutta integrators, whose local-error control needs a real tolerance:
    # theirs is 10x tighter than the joint test's on every block.
    solver_atol, solver_rtol = _NEVER, 0.0
    if solver == "ode" and method not in ("ptc", "implicit_ptc"):
        alpha = min(steps.x, steps.x if steps.x_late is None else steps.x_late)
        solver_atol = 0.1 * min(t for t in (atol, gtol * alpha) if t > 0)
        solver_rtol = 0.1 * rtol
    common = dict(atol=solver_atol, rtol=solver_rtol, max_steps=max_steps,
                  on_nonconvergence="ignore", timeout=timeout, callback=stop_when_all_passed,
                  **options)
    try:
        with torch.no_grad():
            _, solve_stats = solve(solver, augmented, state0, **common)
    except NonFiniteError as exc:
        raise NonFiniteError(
            f"joint_inference: f, the objective or their gradients produced NaN or Inf "
            f"({exc})", exc.step) from exc
    assert selection.state is not None and selection.ratio is not None
    z, x, mu = selection.state
    return _finish(augmented, z, x, mu, solve_stats, on_nonconvergence)


#: The solver's own tolerance inside :func:`joint_inference`, which its test never meets.
_NEVER = 1e-300


def _finish(augmented: _AugmentedMap, z: Tensor, x: Tensor, mu: Tensor, solve_stats: SolverStats,
            on_nonconvergence: OnNonConvergence) -> tuple[Tensor, Tensor, JIIOStats]:
    """Project ``x`` (a no-op for a point the map projected), evaluate the objective and each
    block's residual there, and report the joint test."""
    augmented.differentiable = False
    with torch.no_grad():
        x = augmented.project(x)
        alpha = augmented.steps.x_at(augmented.max_steps, augmented.max_steps)
        fz, value, gz, gx = augmented.gradients(z, x, mu)
        x_next = augmented.project(x - alpha * gx)
        residuals = augmented.residuals(z, x, mu, fz, gz, x_next, alpha)
        ratio = augmented.ratio(z, mu, residuals)
    converged = ratio <= 1.0
    reason = solve_stats.stop_reason
    if bool(converged.all()) or reason == "callback":
        reason = "converged" if bool(converged.all()) else "max_steps"
    solve_stats = dataclasses.replace(
        solve_stats, method=f"joint_inference[{solve_stats.method}]", residual=ratio,
        tolerance=torch.ones_like(ratio), converged=converged, stop_reason=reason)
    report_nonconvergence(solve_stats, on_nonconvergence)
    stats = JIIOStats(
        solver=solve_stats, f_calls=augmented.f_calls, vjps=augmented.vjps,
        objective=value, residual_z=residuals[0], residual_adjoint=residuals[1],
        residual_x=residuals[2], adjoint=mu,
    )
    return z, x, stats


def optimal_objective(
    f: Callable[[Tensor, Tensor], Tensor],
    objective: Objective,
    z: Tensor,
    x: Tensor,
    adjoint: Tensor,
) -> Tensor:
    """The objective at a joint solution, differentiable in the parameters of ``f`` and of the
    objective by the envelope theorem: the gradient of the training loss after JIIO.

    Returns ``L(z*, x*) + <mu*, f(z*, x*) - f(z*, x*).detach()>`` per sample, whose value is
    ``L(z*, x*)`` and whose gradient with respect to any parameter ``theta`` is
    ``dL/dtheta + mu*^T df/dtheta``, with ``z*``, ``x*`` and ``mu*`` held fixed. That is the
    implicit gradient of the DEQ at the fixed input ``x*`` and, because ``x*`` minimizes the
    objective (a constraint set not depending on ``theta``), also the total derivative of the
    optimal value ``min_x L(z*(x, theta), x; theta)`` (envelope / Danskin theorem): no backward
    linear solve is needed, ``mu*`` already is its solution. For an outer loss different from
    the inner objective, differentiate through the DEQ at ``x*`` instead, e.g. with
    :func:`contdeq.equilibrium` (that gradient ignores how ``x*`` moves with ``theta``).

    Args:
        f: the cell given to :func:`joint_inference`.
        objective: the objective given to :func:`joint_inference`, ``(B,)`` per sample.
        z: ``(B, ...)`` ``z*``.
        x: ``(B, ...)`` ``x*``.
        adjoint: ``(B, ...)`` ``mu*`` (``stats.adjoint``), shaped like ``z``.

    Returns:
        ``(B,)`` the objective per sample, carrying the gradient described above.
    """
    z, x, adjoint = z.detach(), x.detach(), adjoint.detach()
    if adjoint.shape != z.shape:
        raise ValueError(f"adjoint must be shaped like z {tuple(z.shape)}, got "
                         f"{tuple(adjoint.shape)}")
    value = objective(z, x)
    if not isinstance(value, Tensor) or value.shape != (z.shape[0],):
        raise ValueError(f"objective(z, x) must return one value per sample, shape (B,) = "
                         f"({z.shape[0]},)")
    fz = f(z, x)
    coupling = (adjoint * (fz - fz.detach())).reshape(z.shape[0], -1).sum(dim=1)
    return value + coupling
