"""The steady-state methods as objects: what :data:`STEADY_STATE_METHODS` holds and
:func:`~contdeq.solvers.steady_state` runs.

A registered steady-state method is an object following
:class:`~contdeq.solvers.protocol.SteadyStateSolver`: ``run(func, z, d, progress, control,
hook) -> LoopResult`` plus a few attributes that :func:`steady_state`'s argument checks read
(whether the method has local-error control, its default largest step, whether it has a
compiled loop). The registry is the dispatch: ``steady_state`` looks the name up and calls
``run``; nothing else names a method. A :class:`~contdeq.solvers.tableaux.Tableau` registered
in :data:`TABLEAUX` is run by :class:`RungeKutta` (see :func:`steady_state_solver`).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

from torch import Tensor

from .callback import StepHook
from .counting import CountedODEFunc
from .implicit_ptc import ImplicitPTCSteps, PTCOptions
from .integrate import RungeKuttaSteps
from .loop import StepControl, run_loop
from .progress import Progress
from .protocol import SteadyStateSolver
from .ptc import PseudoTransientSteps
from .registry import STEADY_STATE_METHODS, TABLEAUX
from .stats import LoopResult
from .tableaux import Tableau
from .torchdiffeq_backend import TorchdiffeqSteps, run_odeint_event
from .validation import check_positive_float, check_positive_int

__all__ = ["PTC", "ImplicitPTC", "RungeKutta", "steady_state_solver"]


class RungeKutta:
    """An embedded Runge-Kutta pair given by its Butcher tableau, stepped on the one loop
    (:class:`~contdeq.solvers.integrate.RungeKuttaSteps`) or, with ``control.backend``,
    by torchdiffeq's step on the same loop or by ``odeint_event``.

    Args:
        tableau: the pair's coefficients, or the name of a tableau in :data:`TABLEAUX`.
        first_step: initial step when ``steady_state`` is given none (default: chosen from
            the problem, :func:`~contdeq.solvers.rk.initial_step`).
        max_step: largest step when ``steady_state`` is given none (default ``inf``).
    """

    local_error_control = True
    compilable = False

    def __init__(self, tableau: Tableau | str, *, first_step: float | None = None,
                 max_step: float = math.inf) -> None:
        self.tableau = TABLEAUX[TABLEAUX.check(tableau, "tableau")] if isinstance(
            tableau, str) else tableau
        if not isinstance(self.tableau, Tableau):
            raise TypeError(f"tableau must be a Tableau or a name in TABLEAUX, got {tableau!r:.80}")
        self.name = self.tableau.name
        self.first_step, self.default_max_step = _steps(first_step, max_step)

    def __repr__(self) -> str:
        return f"RungeKutta({self.name!r})"

    def run(self, func: CountedODEFunc, z: Tensor, d: Tensor, progress: Progress,
            control: StepControl, hook: StepHook | None) -> LoopResult:
        """Integrate from ``z`` (``(B, D)``, derivative ``d``) to steady state."""
        if control.backend == "torchdiffeq":
            return run_loop(TorchdiffeqSteps(func, z, d, progress, self.name, control), z,
                            progress, hook)
        if control.backend == "event":
            return run_odeint_event(func, z, d, progress, self.name, control)
        return run_loop(RungeKuttaSteps(func, z, d, progress, self.tableau, control), z,
                        progress, hook)


class PTC:
    """Explicit pseudo-transient continuation
    (:class:`~contdeq.solvers.ptc.PseudoTransientSteps` on the one loop); ``control.compile``
    runs each step compiled (:mod:`contdeq.solvers.compiled`).

    Args:
        max_step: largest per-sample step when ``steady_state`` is given none (default ``1``,
            the Picard step of a DEQ).
        first_step: initial step when ``steady_state`` is given none (default ``max_step``).
        steps_per_call: with ``compile=True``, steps taken per compiled call (default 1): the
            call's wrapper cost is paid once per ``steps_per_call`` steps, and the solve may
            take up to ``steps_per_call - 1`` evaluations more (it stops at the end of a call;
            see :mod:`contdeq.solvers.compiled`). Ignored without ``compile``.
    """

    name = "ptc"
    local_error_control = False
    compilable = True

    def __init__(self, *, max_step: float = 1.0, first_step: float | None = None,
                 steps_per_call: int = 1) -> None:
        self.first_step, self.default_max_step = _steps(first_step, max_step)
        self.steps_per_call = check_positive_int(steps_per_call, "steps_per_call")

    def __repr__(self) -> str:
        calls = "" if self.steps_per_call == 1 else f", steps_per_call={self.steps_per_call}"
        return (f"PTC(max_step={self.default_max_step!r}, first_step={self.first_step!r}"
                f"{calls})")

    def run(self, func: CountedODEFunc, z: Tensor, d: Tensor, progress: Progress,
            control: StepControl, hook: StepHook | None) -> LoopResult:
        """Iterate from ``z`` (``(B, D)``, derivative ``d``) to steady state."""
        if control.compile:
            from .compiled import CompiledPseudoTransientSteps

            steps = CompiledPseudoTransientSteps(func, z, d, progress, control,
                                                 self.steps_per_call)
            return run_loop(steps, z, progress)
        return run_loop(PseudoTransientSteps(func, z, d, progress, control), z, progress, hook)


class ImplicitPTC:
    """Implicit (backward-Euler, Newton-Krylov) pseudo-transient continuation, Kelley & Keyes'
    ΨTC: :class:`~contdeq.solvers.implicit_ptc.ImplicitPTCSteps` on the one loop.

    Args:
        max_step: largest per-sample step when ``steady_state`` is given none (default ``inf``).
        first_step: initial step when ``steady_state`` is given none (default
            ``options.first_step``).
        options: ΨTC's tunables (step growth, stall test, GMRES restart and cap, JVP mode,
            preconditioner): a :class:`~contdeq.solvers.implicit_ptc.PTCOptions`.
    """

    name = "implicit_ptc"
    local_error_control = False
    compilable = False

    def __init__(self, *, max_step: float = math.inf, first_step: float | None = None,
                 options: PTCOptions | None = None) -> None:
        self.first_step, self.default_max_step = _steps(first_step, max_step)
        if options is not None and not isinstance(options, PTCOptions):
            raise TypeError(f"options must be a PTCOptions, got {type(options).__name__}; "
                            "build one with contdeq.solvers.PTCOptions(...)")
        self.options = options

    def __repr__(self) -> str:
        return (f"ImplicitPTC(max_step={self.default_max_step!r}, "
                f"first_step={self.first_step!r}, options={self.options!r})")

    def run(self, func: CountedODEFunc, z: Tensor, d: Tensor, progress: Progress,
            control: StepControl, hook: StepHook | None) -> LoopResult:
        """Iterate from ``z`` (``(B, D)``, derivative ``d``) to steady state; the result
        carries the Jacobian-vector products and GMRES iterations."""
        steps = ImplicitPTCSteps(func, z, d, progress, control.first_step, control.max_step,
                                 control.t_max, options=self.options)
        return run_loop(steps, z, progress, hook)


def _steps(first_step: float | None, max_step: float) -> tuple[float | None, float]:
    """Checked ``(first_step, max_step)`` of a solver object."""
    if first_step is not None:
        first_step = check_positive_float(first_step, "first_step")
    return first_step, check_positive_float(max_step, "max_step", allow_inf=True)


@cache
def _runge_kutta(tableau: Tableau) -> RungeKutta:
    return RungeKutta(tableau)


def steady_state_solver(method: str | SteadyStateSolver) -> SteadyStateSolver:
    """The solver object of ``method``: a registered name (a tableau's is run by
    :class:`RungeKutta`) or a solver object itself.

    Raises:
        ValueError: an unregistered name (naming the choices).
        TypeError: a registered entry or a given object that does not follow
            :class:`~contdeq.solvers.protocol.SteadyStateSolver`.
    """
    if isinstance(method, str):
        entry: Any = STEADY_STATE_METHODS[STEADY_STATE_METHODS.check(method)]
    else:
        entry = method
    if isinstance(entry, Tableau):
        return _runge_kutta(entry)
    if not isinstance(entry, SteadyStateSolver):
        raise TypeError(
            f"method must be a registered steady-state method name or a solver object with "
            f"name, local_error_control, default_max_step, compilable and run(func, z, d, "
            f"progress, control, hook) (see contdeq.solvers.protocol.SteadyStateSolver), got "
            f"{entry!r:.80}")
    return entry


STEADY_STATE_METHODS.register("implicit_ptc", ImplicitPTC())
STEADY_STATE_METHODS.register("ptc", PTC())
