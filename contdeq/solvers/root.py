"""``root``: solve ``F(x) = 0`` per sample, by Newton (line search or trust region), ΨTC or a
fixed-point iteration; by default (``solver="auto"``) Newton, then ΨTC restarted from ``x0`` on
the samples Newton left unconverged (on the 23 problems of ``benchmarks/nonlinear.py``: Newton
22, ΨTC 20, both in turn 23).

**Sign convention of ΨTC.** ``solver="ptc"`` integrates the pseudo-transient flow
``dx/dt = -F(x)`` by backward Euler (:mod:`contdeq.solvers.implicit_ptc`), each step solving
``(I / h + J_F) delta = -F(x)``: SciML's ``PseudoTransient`` and Kelley & Keyes' ΨTC use the
same sign. Why ``-F``: as ``h -> inf`` the step becomes Newton's for either sign, but for small
``h`` it follows the flow, and a root ``x*`` is a stable equilibrium of ``dx/dt = -F`` exactly
when the eigenvalues of ``J_F(x*)`` have positive real part (``F`` is the gradient of a
convex function, a monotone operator, a discretized elliptic operator ``-Δu + ...``). With
``dx/dt = +F`` such roots repel. Measured on the 23 problems of ``benchmarks/nonlinear.py``:
``-F`` solved 20, ``+F`` 10 (contdeq before this module; see ``docs/root_finding.md``). A
problem whose Jacobian has eigenvalues of negative real part at the root wants ``root(lambda
x: -F(x), ...)``, which has the same roots. The user passes ``F``; ``root`` applies the sign.

The fixed-point solvers (``"anderson"``, ``"broyden"``, ``"picard"``) iterate
``g(x) = x - F(x)``, whose fixed points are the roots (Picard converges when ``I - J_F`` is a
contraction). Newton runs on the same ``g``: its linear systems are ``J_F delta = -F``.

Every solver stops a sample whose smallest ``rms(F)`` has not fallen by ``stall_decrease`` (a
relative ``1e-3``) for ``stall_window`` iterations, and the fixed-point and Newton solvers one
whose residual grew past ``1e4`` times its smallest (diverging): it is reported unconverged
(stop reason ``"stalled"`` when no other limit came first) at its best iterate, never as an
error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .callback import StepInfo, Stop
from .counting import CountedODEFunc
from .errors import ConvergenceError, NonFiniteError, OnNonConvergence, report_nonconvergence
from .fixed_point import fixed_point
from .implicit_ptc import ImplicitPTCSteps, PTCOptions, Stall
from .loop import run_loop
from .progress import Progress
from .stats import SolverStats, StopReason
from .termination import SteadyStateCondition
from .validation import (
    check_callable,
    check_choice,
    check_on_nonconvergence,
    check_positive_float,
    check_positive_int,
    check_state,
    resolve_tolerances,
)

__all__ = ["ROOT_SOLVERS", "root"]

#: The values of ``root``'s ``solver``.
ROOT_SOLVERS = ("newton", "trust_region", "ptc", "anderson", "broyden", "picard", "auto")
#: The options ``solver="auto"`` passes on to both of its stages (it runs each at its defaults).
AUTO_OPTIONS = ("stall_window", "stall_decrease")
#: Newton's linear solves in ``root``: relative tolerance 1e-6 (nearly exact). The
#: Eisenstat-Walker forcing term (Newton's default in ``fixed_point``) solved 22 of the 23
#: problems and took 849 iterations on the generalized Rosenbrock problem, where the inexact
#: early steps break its chain structure; with 1e-6: 23 of 23.
NEWTON_FORCING = 1e-6
#: Stall test of the fixed-point solvers: iterations without a new smallest residual, and the
#: relative decrease that counts as new (ΨTC's are :class:`PTCOptions` fields, same defaults).
STALL_WINDOW = PTCOptions.stall_window
STALL_DECREASE = PTCOptions.stall_decrease
#: A fixed-point or Newton iterate whose residual exceeds this many times the sample's best has
#: diverged and stops at once (ΨTC rejects such a trial instead: ``PTCOptions.blowup``).
DIVERGED = PTCOptions.blowup


def root(
    F: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    solver: str = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    max_steps: int = 1000,
    on_nonconvergence: OnNonConvergence = "warn",
    timeout: float | None = None,
    **options: Any,
) -> tuple[Tensor, SolverStats]:
    """Find ``x`` with ``F(x) = 0`` for every sample of a batch.

    Sample ``b`` (first dimension) has converged when
    ``rms(F(x_b)) <= atol + rtol * rms(x_b)``; converged samples are frozen while the others
    go on, and each unconverged sample returns its best iterate (smallest residual).
    A 1-D ``x0`` is one system (returned 1-D, statistics of shape ``(1,)``).

    Args:
        F: ``F(x) -> residual``, shape, dtype and device of ``x`` preserved, acting on each
            sample separately (for a coupled batch pass it as one 1-D system).
        x0: ``(B, D)`` (or ``(B, ...)``) initial guesses, batch first, or ``(D,)``.
        solver: ``"newton"`` (Newton-Krylov with a backtracking line search, linear
            solves to relative ``1e-6``), ``"trust_region"`` (Newton with Powell's dogleg),
            ``"ptc"`` (ΨTC on ``dx/dt = -F(x)``, see the module docstring), or a fixed-point
            iteration on ``x - F(x)``: ``"anderson"``, ``"broyden"``, ``"picard"``; or
            ``"auto"`` (default): Newton, then ΨTC on the batch, the samples Newton left
            unconverged restarted from ``x0`` (each stage at its defaults, ``max_steps``
            each; statistics summed, each sample keeps the stage with the smaller residual).
        atol, rtol: tolerances (RMS norms); default
            :func:`~contdeq.solvers.validation.default_tolerance` of ``x0``'s dtype.
        max_steps: iteration limit (ΨTC: steps, rejected ones included).
        on_nonconvergence: ``"ignore"``, ``"warn"`` (default) or ``"raise"``
            (:class:`~contdeq.solvers.ConvergenceError`, with ``.stats`` and ``.x``, the
            best iterates).
        timeout: wall-clock limit in seconds.
        **options: ``stall_window=50``, ``stall_decrease=1e-3`` (every solver); Newton's
            options (``jvp``, ``restart``, ``max_linear_iterations``, ``line_search_steps``,
            ``forcing=1e-6``, ``trust_radius``; see :class:`~contdeq.solvers.newton.Newton`);
            ΨTC's :class:`~contdeq.solvers.implicit_ptc.PTCOptions` fields (``first_step``,
            ``min_growth``, ``max_growth``, ``restart``, ``preconditioner``, ...); the
            fixed-point solvers' options (``memory``, ``damping``, ...); ``"auto"`` takes
            only ``stall_window`` and ``stall_decrease``. Unknown ones raise.

    Returns:
        ``(x, stats)``: ``x`` shaped like ``x0``, without autograd history (the iterations run
        under ``torch.no_grad()``; differentiate a root implicitly, e.g. with
        :mod:`contdeq.implicit`); a :class:`SolverStats` whose ``residual`` is
        ``rms(F(x_b))`` per sample, ``nfe`` counts every call of ``F`` (``jvps`` the Jacobian
        products of Newton and ΨTC) and ``stop_reason`` is ``"stalled"`` when every
        unconverged sample stalled (``"auto"``: the stop reason of its last stage).

    Raises:
        ConvergenceError: with ``on_nonconvergence="raise"`` (``.x``: the best iterates).
        NonFiniteError: ``F`` returned NaN/Inf at ``x0``, or at finite trial points with no
            finite way forward.
        ValueError, TypeError: bad arguments (the message names the argument).
    """
    check_callable(F, "F", "F(x) -> residual")
    check_choice(solver, "solver", ROOT_SOLVERS)
    x0 = check_state(x0, "x0")
    check_positive_int(max_steps, "max_steps")
    check_on_nonconvergence(on_nonconvergence)
    if timeout is not None:
        check_positive_float(timeout, "timeout")
    unbatched = x0.ndim == 1
    batched = x0.unsqueeze(0) if unbatched else x0
    fn = (lambda x: F(x.squeeze(0)).unsqueeze(0)) if unbatched else F
    atol, rtol = resolve_tolerances(atol, rtol, batched)
    with torch.no_grad():  # the iterations are not differentiated (Jacobian products are)
        if solver == "ptc":
            x, stats = _solve_ptc(fn, batched, float(atol), float(rtol), max_steps, timeout,
                                  options)
        elif solver == "auto":
            x, stats = _solve_auto(fn, batched, atol, rtol, max_steps, timeout, options)
        else:
            x, stats = _solve_fixed_point(fn, batched, solver, atol, rtol, max_steps, timeout,
                                          options)
    x = x.squeeze(0) if unbatched else x
    try:
        report_nonconvergence(stats, on_nonconvergence)
    except ConvergenceError as error:
        error.x = x  # type: ignore[attr-defined]
        raise
    return x, stats


def _solve_ptc(F: Callable[[Tensor], Tensor], x0: Tensor, atol: float, rtol: float,
               max_steps: int, timeout: float | None, options: dict[str, Any]
               ) -> tuple[Tensor, SolverStats]:
    """ΨTC on ``dx/dt = -F(x)``; ``x0`` batched."""
    try:
        opts = PTCOptions(**options)
    except TypeError as exc:
        raise TypeError(f"root(solver='ptc'): {exc}") from None
    counted = CountedODEFunc(lambda t, x: -F(x), x0, name="F")
    z = x0.reshape(counted.flat_shape)
    d = counted(0.0, z)
    progress = Progress(SteadyStateCondition(atol, rtol), z, d, max_steps=max_steps,
                        timeout=timeout, record=False, name="F", track_time=True)
    result = run_loop(ImplicitPTCSteps(counted, z, d, progress, None, math.inf, math.inf,
                                       options=opts), z, progress)
    stats = progress.finish("ptc", counted.calls, result.stop_reason, result.accepted,
                            result.rejected)
    stats.jvps, stats.linear_iterations = result.jvps, result.linear_iterations
    return result.z.reshape(x0.shape), stats


def _solve_auto(F: Callable[[Tensor], Tensor], x0: Tensor, atol: Tensor, rtol: Tensor,
                max_steps: int, timeout: float | None, options: dict[str, Any]
                ) -> tuple[Tensor, SolverStats]:
    """Newton, then ΨTC restarted from ``x0`` on the samples Newton left unconverged (a
    two-stage polyalgorithm like NonlinearSolve.jl's default); ``x0`` batched."""
    unknown = sorted(set(options) - set(AUTO_OPTIONS))
    if unknown:
        raise TypeError(f"root(solver='auto') got unexpected options {unknown}: it runs Newton "
                        f"and ΨTC at their defaults and takes only {list(AUTO_OPTIONS)}; pass "
                        "solver='newton' or solver='ptc' to tune one")
    start = time.perf_counter()
    x, stats = _solve_fixed_point(F, x0, "newton", atol, rtol, max_steps, timeout, options)
    stats.method = "auto"
    if stats.all_converged:
        return x, stats
    # The whole batch goes on (F may hold per-sample data, e.g. a layer's input): the samples
    # Newton converged start at its root, converged at once and frozen; the others at x0.
    newton_done = stats.converged.reshape((-1,) + (1,) * (x0.ndim - 1))
    remaining = None if timeout is None else max(timeout - (time.perf_counter() - start), 1e-3)
    x_ptc, ptc = _solve_ptc(F, torch.where(newton_done, x, x0), float(atol), float(rtol),
                            max_steps, remaining, dict(options))
    take = ~stats.converged & (ptc.converged | (ptc.residual < stats.residual))
    x = torch.where(take.reshape(newton_done.shape), x_ptc, x)
    for name in ("residual", "tolerance", "converged"):
        setattr(stats, name, torch.where(take, getattr(ptc, name), getattr(stats, name)))
    stats.nfe += ptc.nfe
    stats.steps += ptc.steps
    stats.jvps = (stats.jvps or 0) + (ptc.jvps or 0)
    stats.linear_iterations = (stats.linear_iterations or 0) + (ptc.linear_iterations or 0)
    stats.accepted = stats.rejected = None  # Newton has no rejections; a sum would mislead
    stats.wall_time = time.perf_counter() - start
    stats.stop_reason = StopReason.CONVERGED if stats.all_converged else ptc.stop_reason
    return x, stats


def _solve_fixed_point(F: Callable[[Tensor], Tensor], x0: Tensor, solver: str,
                       atol: float, rtol: float, max_steps: int, timeout: float | None,
                       options: dict[str, Any]) -> tuple[Tensor, SolverStats]:
    """Newton (either globalization) or a fixed-point iteration on ``g(x) = x - F(x)``."""
    options = dict(options)
    stall = _StallStop(options.pop("stall_window", STALL_WINDOW),
                       options.pop("stall_decrease", STALL_DECREASE))
    method = solver
    if solver in ("newton", "trust_region"):
        method = "newton"
        options.setdefault("forcing", NEWTON_FORCING)
        if solver == "trust_region":
            if "globalization" in options:
                raise TypeError("root(solver='trust_region') sets globalization itself; use "
                                "solver='newton' for the line search")
            options["globalization"] = "trust_region"
    try:
        x, stats = fixed_point(lambda x: x - F(x), x0, method=method, atol=atol, rtol=rtol,
                               max_steps=max_steps, on_nonconvergence="ignore",
                               timeout=timeout, callback=stall, **options)
    except TypeError as exc:
        raise TypeError(f"root(solver={solver!r}): {exc}") from None
    except NonFiniteError as exc:  # name the user's F, not the internal g = x - F(x)
        raise NonFiniteError(
            f"root(solver={solver!r}): {exc} (g(x) = x - F(x): F returned NaN/Inf, typically "
            "at an iterate the fixed-point iteration diverged to; solver='newton' or 'ptc' "
            "globalize)", exc.step) from None
    if stats.stop_reason == StopReason.CALLBACK:  # only the stall test stops by callback
        stats.stop_reason = StopReason.STALLED
    stats.method = solver
    return x, stats


class _StallStop:
    """Step callback: ``Stop()`` once every active sample has gone ``window`` iterations
    without its residual falling below ``(1 - decrease)`` times its smallest so far."""

    def __init__(self, window: object, decrease: object) -> None:
        self.window = check_positive_int(window, "stall_window")
        if isinstance(decrease, bool) or not isinstance(decrease, (int, float)) or not (
                0.0 <= decrease < 1.0):
            raise ValueError(f"stall_decrease must be a float in [0, 1), got {decrease!r}")
        self.decrease = float(decrease)
        self.stall: Stall | None = None

    def __call__(self, info: StepInfo) -> Stop | None:
        if self.stall is None:
            self.stall = Stall(info.residual, self.window, self.decrease)
            return None
        stall = self.stall
        stall.update(info.residual, torch.ones_like(info.active))
        # A residual grown past ``blowup`` times the best is diverging (a fixed-point iteration
        # whose I - J_F is no contraction): stop it at its best iterate before it overflows.
        diverged = ~(info.residual <= DIVERGED * stall.best)
        stall.since = torch.where(diverged, self.window, stall.since)
        stalled = stall.since >= self.window
        if bool(info.active.any()) and bool(stalled[info.active].all()):
            return Stop()
        return None
