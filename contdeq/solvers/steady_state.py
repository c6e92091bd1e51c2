"""``steady_state``: integrate ``dz/dt = func(t, z)`` until ``dz/dt`` vanishes, per sample."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import Any, Literal

from torch import Tensor

from .._warnings import warn
from .callback import StepCallback, StepHook
from .counting import CountedODEFunc
from .errors import OnNonConvergence, report_nonconvergence
from .implicit_ptc import ImplicitPTC  # noqa: F401  (registers "implicit_ptc")
from .integrate import RungeKutta
from .loop import StepControl
from .progress import Progress
from .protocol import SteadyStateSolver
from .ptc import PTC  # noqa: F401  (registers "ptc", after "implicit_ptc")
from .registry import STEADY_STATE_METHODS
from .stats import Solution
from .structure import solve_flattened
from .tableaux import Tableau
from .termination import SteadyStateCondition
from .torchdiffeq_backend import EVENT_METHODS, TORCHDIFFEQ_FSAL_METHODS
from .unbatched import solve_as_one_sample
from .validation import (
    check_bool,
    check_callable,
    check_callback,
    check_choice,
    check_on_nonconvergence,
    check_positive_float,
    check_positive_int,
    check_state,
    check_tolerances,
    resolve_tolerances,
)

#: Implementations of the Runge-Kutta solve.
BACKENDS = ("lean", "torchdiffeq", "event")
#: Integrator tolerances are the steady-state tolerances times this factor by default.
ODE_TOLERANCE_FACTOR = 0.1

Backend = Literal["lean", "torchdiffeq", "event"]


def steady_state(
    func: Callable[[Tensor, Tensor], Tensor],
    z0: Tensor | tuple[Tensor, ...],
    *,
    method: str | SteadyStateSolver = "dopri5",
    atol: float | None = None,
    rtol: float | None = None,
    ode_atol: float | None = None,
    ode_rtol: float | None = None,
    max_steps: int = 1000,
    t_max: float = math.inf,
    first_step: float | None = None,
    max_step: float | None = None,
    backend: Backend = "lean",
    on_nonconvergence: OnNonConvergence = "warn",
    record_trajectory: bool = False,
    timeout: float | None = None,
    per_sample: bool = True,
    callback: StepCallback | None = None,
    compile: bool = False,
) -> Solution:
    """Integrate ``dz/dt = func(t, z)`` from ``z0`` until every sample is at steady state.

    For a deep equilibrium layer ``func(t, z) = f(z, x) - z``: the steady state is the fixed
    point ``z* = f(z*, x)``. Sample ``b`` (first dimension) has converged when
    ``rms(dz_b/dt) <= atol + rtol * rms(z_b)`` (RMS over all other dimensions); it is then
    frozen (its derivative is masked to zero) while the others go on. The test uses the
    derivative the last accepted step already computed (FSAL), so termination costs no extra
    evaluation. When the loop stops, the frozen ones are re-tested on the last step's
    evaluation (again no extra call): when every sample had converged, those that no longer
    pass iterate again; at a limit they are returned unconverged.

    A 1-D ``z0`` is one unbatched state (torchdiffeq's convention): it is tested and stepped
    as a whole, and ``z`` is 1-D. ``per_sample=False`` does the same for a whole batch, for a
    ``func`` that couples its samples (a batch mean or normalization, attention across the
    batch): per-sample freezing assumes each sample's derivative depends on that sample only.

    Args:
        func: right-hand side ``func(t, z) -> dz/dt`` with ``t`` a 0-dim tensor and ``z`` of
            ``z0``'s shape, dtype and device. Steady states need autonomous dynamics; ``t`` is
            passed for compatibility with torchdiffeq-style functions.
        z0: ``(B, ...)`` initial state, batch dimension first, floating point, finite; a 1-D
            ``(D,)`` state is one unbatched sample (returned 1-D, statistics of shape ``(1,)``).
            Or a
            tuple of per-scale states ``(B, *shape_s)``: then ``func(t, zs)`` takes and returns
            such tuples, the solve runs on them flattened (one residual norm per sample over
            all scales; :func:`~contdeq.solvers.flatten_states`) and ``z`` is a tuple.
        method: ``"dopri5"`` (default), ``"tsit5"``, ``"bosh3"``, ``"dopri8"``,
            ``"adaptive_heun"`` (embedded Runge-Kutta pairs), or ``"ptc"``:
            pseudo-transient continuation, forward Euler with per-sample steps chosen for
            reaching the steady state (one evaluation per step; usually the fewest evaluations
            for contractive layers, see ``docs/solvers.md``), or ``"implicit_ptc"``:
            backward-Euler pseudo-transient continuation, each step a Newton-Krylov solve
            (GMRES with Jacobian-vector products, counted in ``stats.jvps``), for stiff
            problems (PDE discretizations) where explicit steps are stability-limited. A trial
            step that produces NaN/Inf is rejected and shrunk, whatever the method. Any name
            registered in :data:`~contdeq.solvers.STEADY_STATE_METHODS`, or a solver object
            following :class:`~contdeq.solvers.protocol.SteadyStateSolver`.
        atol, rtol: steady-state tolerances (RMS norms); either may be 0 (not both). Default
            (``None``): :func:`~contdeq.solvers.validation.default_tolerance` of ``z0``'s dtype,
            ``1e-4`` for float32/float64, ``2 * eps`` for half precision (bf16 ``1.56e-2``,
            fp16 ``1.95e-3``; also under ``torch.autocast`` to those).
        ode_atol, ode_rtol: the integrator's local-error tolerances. Default:
            ``0.1 * atol`` and ``0.1 * rtol``. An integrator looser than the steady-state test
            lets the step sit at its stability limit where the residual chatters and never
            meets the test; a looser pair is rejected, one less than 10x tighter is warned about.
            ``"ptc"`` and ``"implicit_ptc"`` have no local-error control and reject them.
        max_steps: limit on solver steps (accepted + rejected).
        t_max: limit on the pseudo-time.
        first_step: initial step; default the solver object's ``first_step`` when it has
            one (``PTC(first_step=...)``), else chosen from ``||func(0, z0)||`` at no extra cost
            (see :func:`contdeq.solvers.rk.initial_step`); ``max_step`` for ``"ptc"``, ``1.0``
            for ``"implicit_ptc"``.
        max_step: largest step (default the method's ``default_max_step``: ``inf``; ``1.0``
            for ``"ptc"``, where ``h = 1`` is the Picard step; ``PTC(max_step=...)`` sets it).
        backend: ``"lean"`` (default, fastest: our own stepper), ``"torchdiffeq"``
            (torchdiffeq's stepping loop with our terminator; dopri5, bosh3, dopri8) or
            ``"event"`` (torchdiffeq's public ``odeint_event``; no per-sample freezing).
        on_nonconvergence: ``"ignore"``, ``"warn"`` (default) or ``"raise"``
            (:class:`~contdeq.solvers.errors.ConvergenceError`) when a sample is unconverged.
        record_trajectory: keep per-step residuals and times in the stats.
        timeout: wall-clock limit in seconds (every backend).
        per_sample: ``True`` (default): each sample is tested and frozen on its own;
            ``False``: the batch is one state (one test, one step size), for a ``func`` that
            couples samples. Statistics then have shape ``(1,)``.
        callback: ``callback(info) -> None | Stop() | Restart(z=...)``, called after every
            accepted step (every iteration of ``"ptc"``/``"implicit_ptc"``) with a
            :class:`~contdeq.solvers.callback.StepInfo`: observe, stop
            (``stats.stop_reason == "callback"``) or replace the state / announce a changed
            ``func`` (see :mod:`contdeq.solvers.callback`). Not supported by
            ``backend="event"``.
        compile: run each step compiled by ``torch.compile`` (``method="ptc"`` only; see
            :mod:`contdeq.solvers.compiled`): fixed shapes, no host synchronization inside a
            step, one per step. The first solve of a shape compiles the step (seconds to a
            minute); later solves of the same shapes reuse it. Not combined with
            ``callback``.

    Returns:
        A :class:`~contdeq.solvers.Solution` ``(z, stats)`` (it unpacks as ``z, stats = ...``):
        ``z`` shaped like ``z0``; ``stats`` a :class:`SolverStats` with the
        residual, tolerance and convergence of each sample and the exact number of calls
        of ``func``. A sample that stops unconverged returns its best state (smallest
        residual; the event backend: the last).

    Raises:
        NonFiniteError: ``func`` is NaN/Inf at ``z0`` or at every one of many shrinking trial
            steps from an accepted state, the step size underflowed, or the solve stopped
            right after NaN/Inf trials (the message says which).
        ValueError, TypeError: bad arguments (the message names the argument), or ``func``
            modified its input in place.
    """
    if isinstance(z0, tuple):  # per-scale states: solve on them flattened
        return Solution(*solve_flattened(steady_state, locals()))
    check_bool(per_sample, "per_sample")
    check_bool(compile, "compile")
    if isinstance(z0, Tensor) and z0.ndim >= 1 and (z0.ndim == 1 or not per_sample):
        return Solution(*solve_as_one_sample(steady_state, locals()))
    solver = steady_state_solver(method)
    method = solver.name
    if compile:
        if not solver.compilable:
            from .compiled import compile_supported

            compile_supported(method)  # raises, naming the methods that compile
        if callback is not None:
            raise ValueError("compile=True does not take a callback (the compiled step has no "
                             "hook); use compile=False with callback")
    check_callable(func, "func", "func(t, z) -> dz/dt")
    z0 = check_state(z0)
    check_choice(backend, "backend", BACKENDS)
    atol, rtol = resolve_tolerances(atol, rtol, z0)
    check_positive_int(max_steps, "max_steps")
    t_max = check_positive_float(t_max, "t_max", allow_inf=True)
    check_on_nonconvergence(on_nonconvergence)
    if timeout is not None:
        check_positive_float(timeout, "timeout")
    if first_step is not None:
        check_positive_float(first_step, "first_step")
    else:
        first_step = getattr(solver, "first_step", None)
    max_step = check_positive_float(
        solver.default_max_step if max_step is None else max_step, "max_step", allow_inf=True
    )
    if backend != "lean":
        allowed = TORCHDIFFEQ_FSAL_METHODS if backend == "torchdiffeq" else EVENT_METHODS
        check_choice(method, f"method (with backend={backend!r})", allowed)
    if check_callback(callback) is not None and backend == "event":
        raise ValueError("callback is not supported by backend='event': torchdiffeq's "
                         "odeint_event neither shows the state after each step nor lets it be "
                         "changed; use backend='lean' or 'torchdiffeq'")
    if not solver.local_error_control and (ode_atol is not None or ode_rtol is not None):
        raise ValueError(
            f"ode_atol and ode_rtol do not apply to method={method!r} (it chooses its steps from "
            "the "
            "residual, with no local-error control); drop them, or use an embedded Runge-Kutta "
            "method such as 'dopri5'"
        )
    ode_atol, ode_rtol = _integrator_tolerances(atol, rtol, ode_atol, ode_rtol,
                                                solver.local_error_control)

    condition = SteadyStateCondition(float(atol), float(rtol))
    counted = CountedODEFunc(func, z0, name="func")
    z = z0.reshape(counted.flat_shape)
    d = counted(0.0, z)
    progress = Progress(
        condition, z, d, max_steps=max_steps, timeout=timeout, record=record_trajectory,
        name="func", track_time=True,
    )
    control = StepControl(ode_atol, ode_rtol, first_step, max_step, t_max, backend, compile)
    hook = None if callback is None else StepHook(callback, method, counted.shape, counted)
    result = solver.run(counted, z, d, progress, control, hook)
    label = method if backend == "lean" else f"{method}[{backend}]"
    stats = progress.finish(label, counted.calls, result.stop_reason, result.accepted,
                            result.rejected)
    stats.jvps, stats.linear_iterations = result.jvps, result.linear_iterations
    stats.final_input = counted.final_input
    report_nonconvergence(stats, on_nonconvergence)
    return Solution(result.z.reshape(z0.shape), stats)


def _integrator_tolerances(
    atol: float, rtol: float, ode_atol: float | None, ode_rtol: float | None,
    local_error_control: bool,
) -> tuple[float, float]:
    ode_atol = ODE_TOLERANCE_FACTOR * atol if ode_atol is None else ode_atol
    ode_rtol = ODE_TOLERANCE_FACTOR * rtol if ode_rtol is None else ode_rtol
    check_tolerances(ode_atol, ode_rtol, prefix="ode_")
    if not local_error_control:
        return ode_atol, ode_rtol
    if ode_atol > atol or ode_rtol > rtol:
        raise ValueError(
            f"ode_atol={ode_atol}, ode_rtol={ode_rtol} are looser than the steady-state "
            f"atol={atol}, rtol={rtol}: the integrator would sit at its stability limit and the "
            "residual would not fall below the steady-state tolerance; use integrator "
            "tolerances at least 10x tighter (the default)"
        )
    if ode_atol > 0.1 * atol or ode_rtol > 0.1 * rtol:
        warn(
            f"ode_atol={ode_atol}, ode_rtol={ode_rtol} are less than 10x tighter than the "
            f"steady-state atol={atol}, rtol={rtol}; the solve may chatter near steady state",
            RuntimeWarning,
        )
    return ode_atol, ode_rtol


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
    # A runtime-checkable protocol's isinstance reads every member (about 10 us, a tenth of a
    # small solve's setup): the verdict is kept per class.
    if type(entry) in _SOLVER_CLASSES:
        return entry
    if not isinstance(entry, SteadyStateSolver):
        raise TypeError(
            f"method must be a registered steady-state method name or a solver object with "
            f"name, local_error_control, default_max_step, compilable and run(func, z, d, "
            f"progress, control, hook) (see contdeq.solvers.protocol.SteadyStateSolver), got "
            f"{entry!r:.80}")
    _SOLVER_CLASSES.add(type(entry))
    return entry


#: Classes whose instances :func:`steady_state_solver` found to follow the protocol.
_SOLVER_CLASSES: set[type] = set()
