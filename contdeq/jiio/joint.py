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
    SolverStats,
    sample_rms,
    solve,
)
from ..solvers.errors import OnNonConvergence, report_nonconvergence
from ..solvers.validation import (
    check_callable,
    check_choice,
    check_func_output,
    check_positive_float,
    check_state,
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
    """Step sizes of the augmented map.

    Attributes:
        x: ``alpha``, the gradient step on the input (what plain projected gradient descent
            on ``L(z*(x), x)`` would use).
        z: ``beta_z`` in ``(0, 1]``, damping of the DEQ update (1: ``z <- f(z, x)``).
        adjoint: ``beta_mu`` in ``(0, 1]``, damping of the adjoint update.
    """

    x: float = 0.1
    z: float = 1.0
    adjoint: float = 1.0

    def __post_init__(self) -> None:
        check_positive_float(self.x, "step_sizes.x")
        for name in ("z", "adjoint"):
            value = check_positive_float(getattr(self, name), f"step_sizes.{name}")
            if value > 1.0:
                raise ValueError(f"step_sizes.{name} must be in (0, 1], got {value}")


@dataclass
class JIIOStats:
    """What :func:`joint_inference` did, and where it stopped.

    Attributes:
        solver: statistics of the augmented solve (its ``nfe`` counts augmented steps).
        f_calls: calls of ``f``, including the final evaluation at the returned point.
        vjps: vector-Jacobian products (one per augmented step, through ``f`` and the
            objective together), including the final evaluation.
        objective: ``(B,)`` the objective at the returned ``(z*, x*)``.
        residual_z: ``(B,)`` ``rms(f(z*, x*) - z*)``.
        residual_adjoint: ``(B,)`` ``rms(dL/dz + (df/dz)^T mu - mu)`` at the returned point.
        residual_x: ``(B,)`` ``rms(P(x* - alpha g) - x*)``: the projected gradient step that
            remains (``g = dL/dx + (df/dx)^T mu``; 0 at a constrained stationary point).
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
        """True when every sample's augmented residual met its tolerance."""
        return self.solver.all_converged

    def summary(self) -> str:
        """One line: the solve, the calls, the objective and the largest block residuals."""
        return (f"{self.solver.summary()}; f calls {self.f_calls}, VJPs {self.vjps}, "
                f"objective mean {float(self.objective.mean()):.4g}, max residual "
                f"z {float(self.residual_z.max()):.3g}, adjoint "
                f"{float(self.residual_adjoint.max()):.3g}, x {float(self.residual_x.max()):.3g}")


class _AugmentedMap:
    """The augmented map on ``(z, x, mu)``; counts calls of ``f`` and VJPs, checks outputs."""

    def __init__(self, f: Callable[[Tensor, Tensor], Tensor], objective: Objective,
                 project: Projection, steps: StepSizes,
                 callback: Callable[[Tensor, Tensor], None] | None) -> None:
        self.f = f
        self.objective = objective
        self.project = project
        self.steps = steps
        self.callback = callback
        self.f_calls = 0
        self.vjps = 0
        self.checked = False

    def gradients(self, z: Tensor, x: Tensor, mu: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``f(z, x)``, ``L(z, x)`` ``(B,)`` and ``dL/d(z, x) + mu^T df/d(z, x)``."""
        with torch.enable_grad():
            zr = z.detach().requires_grad_(True)
            xr = x.detach().requires_grad_(True)
            fz = self._call_f(zr, xr)
            self.f_calls += 1
            value = self.objective(zr, xr)
            if not self.checked:
                self._check(fz, value, zr)
            outputs, cotangents = [value], [torch.ones_like(value)]
            if fz.requires_grad:
                outputs.append(fz)
                cotangents.append(mu)
            gz, gx = torch.autograd.grad(outputs, (zr, xr), cotangents, allow_unused=True)
            self.vjps += 1
        gz = torch.zeros_like(z) if gz is None else gz
        gx = torch.zeros_like(x) if gx is None else gx
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

    def step_x(self, x: Tensor, gx: Tensor) -> Tensor:
        """``P(x - alpha g)``, the output checked at the first call."""
        out = self.project(x - self.steps.x * gx)
        if not self.checked:
            check_func_output(out, x, "project(x)", state="x0")
            self.checked = True
        return out

    def __call__(self, state: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        z, x, mu = state
        fz, _, gz, gx = self.gradients(z, x, mu)
        z_next = z + self.steps.z * (fz - z)
        mu_next = mu + self.steps.adjoint * (gz - mu)
        x_next = self.step_x(x, gx)
        if self.callback is not None:
            self.callback(z_next, x_next)
        return z_next, x_next, mu_next


def _identity(x: Tensor) -> Tensor:
    return x


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
    max_steps: int = 500,
    on_nonconvergence: OnNonConvergence = "warn",
    timeout: float | None = None,
    callback: Callable[[Tensor, Tensor], None] | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor, JIIOStats]:
    """Solve ``min_x objective(z*(x), x)`` with ``z*(x) = f(z*, x)``, per sample, as one
    augmented equilibrium over ``(z, x, mu)`` (see :mod:`contdeq.jiio`).

    Samples must be independent (no batch statistics in ``f`` or the objective): each
    sample's gradient is taken from the sum of the per-sample objectives.

    Args:
        f: the DEQ's cell, ``f(z, x) -> z`` (a module or any callable), ``z`` ``(B, ...)``.
        objective: ``objective(z, x) -> (B,)``, differentiable in ``z`` or ``x``; minimized.
            (To maximize, return its negative.)
        x0: ``(B, ...)`` initial input (feasible, or it is projected at the first step).
        z0: ``(B, ...)`` initial state; default zeros shaped like ``x0``.
        solver: ``"anderson"`` (default), ``"broyden"``, ``"picard"`` (through
            :func:`~contdeq.solvers.fixed_point`) or ``"ode"``: the steady state of
            ``d(z, x, mu)/dt = map(z, x, mu) - (z, x, mu)`` by
            :func:`~contdeq.solvers.steady_state`.
        step_sizes: the input's gradient step ``alpha`` (a float), or a :class:`StepSizes`
            with the dampings of the DEQ and adjoint updates too.
        project: ``project(x) -> x`` onto the feasible inputs, ``(B, ...)``; e.g.
            :func:`~contdeq.jiio.linf_ball`, :func:`~contdeq.jiio.box`. Default: none.
        atol, rtol: tolerances of the augmented residual (RMS over the stacked
            ``(z, x, mu)`` of each sample).
        max_steps: limit on the solver's steps.
        on_nonconvergence: ``"ignore"``, ``"warn"`` (default) or ``"raise"``
            (:class:`~contdeq.solvers.ConvergenceError`), as for the solvers.
        timeout: wall-clock limit in seconds.
        callback: called as ``callback(z, x)`` (``(B, ...)`` each, detached) after every
            augmented step with the updated iterates, e.g. to record a trajectory.
        **options: options of the solver (anderson ``memory``, ``damping``: 20 and 0.5 here,
            not 5 and 1; ...; for
            ``"ode"`` the keywords of :func:`~contdeq.solvers.steady_state`, e.g.
            ``method="ptc"``).

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
    if z0.shape[0] != x0.shape[0] or z0.dtype != x0.dtype or z0.device != x0.device:
        raise ValueError(f"z0 must have x0's batch size, dtype and device ({x0.shape[0]}, "
                         f"{x0.dtype}, {x0.device}), got ({z0.shape[0]}, {z0.dtype}, "
                         f"{z0.device})")
    check_choice(solver, "solver", JIIO_SOLVERS)
    if project is not None:
        check_callable(project, "project", "project(x) -> x")
    if callback is not None:
        check_callable(callback, "callback", "callback(z, x)")
    steps = step_sizes if isinstance(step_sizes, StepSizes) else StepSizes(x=step_sizes)
    augmented = _AugmentedMap(f, objective, project or _identity, steps, callback)
    state0 = (z0.detach(), x0.detach(), torch.zeros_like(z0))
    if solver == "anderson":
        options = {"memory": ANDERSON_MEMORY, "damping": ANDERSON_DAMPING, **options}
    common = dict(atol=atol, rtol=rtol, max_steps=max_steps, on_nonconvergence="ignore",
                  timeout=timeout, **options)
    try:
        with torch.no_grad():
            (z, x, mu), solve_stats = solve(solver, augmented, state0, **common)
    except NonFiniteError as exc:
        raise NonFiniteError(
            f"joint_inference: f, the objective or their gradients produced NaN or Inf "
            f"({exc})", exc.step) from exc
    solve_stats = dataclasses.replace(solve_stats, method=f"joint_inference[{solve_stats.method}]")
    report_nonconvergence(solve_stats, on_nonconvergence)
    return _finish(augmented, z, x, mu, solve_stats)


def _finish(augmented: _AugmentedMap, z: Tensor, x: Tensor, mu: Tensor, solve_stats: SolverStats
            ) -> tuple[Tensor, Tensor, JIIOStats]:
    """Project ``x`` (the solver may return an extrapolated iterate), evaluate the objective
    and each block's residual there."""
    with torch.no_grad():
        x = augmented.project(x)
        fz, value, gz, gx = augmented.gradients(z, x, mu)
        stats = JIIOStats(
            solver=solve_stats, f_calls=augmented.f_calls, vjps=augmented.vjps,
            objective=value, residual_z=sample_rms(fz - z),
            residual_adjoint=sample_rms(gz - mu),
            residual_x=sample_rms(augmented.project(x - augmented.steps.x * gx) - x),
            adjoint=mu,
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
