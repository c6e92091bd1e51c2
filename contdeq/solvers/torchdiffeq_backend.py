"""The same steady-state solve on torchdiffeq's machinery, for comparison.

* ``backend="torchdiffeq"`` drives torchdiffeq's own Runge-Kutta loop
  (``RKAdaptiveStepsizeODESolver._adaptive_step``, an internal of torchdiffeq 0.2) and stops on
  its FSAL derivative, freezing converged samples by masking the derivative.
* ``backend="event"`` uses only torchdiffeq's public API, ``odeint_event``: the event function
  ``max_b(||dz_b/dt|| - tol_b)`` must evaluate f again at every accepted step, and the crossing
  time is then located by bisection on the dense-output interpolant (more evaluations).
  Samples are not frozen.

Both are slower than the lean loop (see ``benchmarks/solvers.py``); they exist so that the lean
loop can be checked and measured against them. Both reject a trial step whose error estimate is
NaN/Inf (the norm given to torchdiffeq maps NaN to ``inf``, so its controller shrinks the step
instead of taking a NaN step size), with the lean loop's bound on such trials in a row
(:class:`~contdeq.solvers.loop.NonFiniteTrials`), and both honour ``timeout``.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor
from torchdiffeq import odeint_event
from torchdiffeq._impl.misc import _all_callback_names, _null_callback, _PerturbFunc
from torchdiffeq._impl.odeint import SOLVERS

from .counting import CountedODEFunc
from .loop import NONFINITE_SHRINK, NonFiniteTrials, StepControl, Stepper
from .progress import Progress
from .rk import initial_step
from .stats import LoopResult, StopReason
from .tableaux import TABLEAUX
from .termination import sample_rms
from .validation import all_finite, raise_nonfinite, raise_step_underflow

#: Methods whose torchdiffeq loop returns the derivative at the new state (FSAL pairs).
TORCHDIFFEQ_FSAL_METHODS = ("dopri5", "bosh3", "dopri8")
#: Methods torchdiffeq 0.2 offers that ``odeint_event`` can run.
EVENT_METHODS = ("dopri5", "bosh3", "dopri8", "adaptive_heun")


class _ErrorNorm:
    """Largest per-sample RMS of torchdiffeq's scaled error; ``inf`` when it is NaN (a NaN/Inf
    stage), so the step is rejected and shrunk rather than given a NaN size. ``nonfinite``
    tells whether the last error was NaN/Inf."""

    def __init__(self) -> None:
        self.nonfinite = False

    def __call__(self, x: Tensor) -> Tensor:
        value = sample_rms(x).max().nan_to_num_(nan=math.inf)
        self.nonfinite = not math.isfinite(float(value))  # torchdiffeq syncs on it anyway
        return value


def _error_atol(atol: float, z: Tensor) -> float:
    """``atol``, or the smallest normal number for ``atol = 0`` (keeps exact zeros of the state
    from an error scale of 0, and 0 / 0)."""
    return atol if atol > 0 else torch.finfo(z.dtype).tiny


class _Timeout(Exception):
    """Raised inside ``odeint_event`` to stop it at the solve's timeout."""


class _MaskedFunc(torch.nn.Module):
    """``mask * func(t, z)``; ``mask`` is updated in place as samples converge. The last
    unmasked evaluation is kept in ``last`` (frozen samples included)."""

    def __init__(self, func: CountedODEFunc, mask: Tensor) -> None:
        super().__init__()
        self.func = func
        self.mask = mask
        self.last: Tensor | None = None

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        self.last = self.func(t, z)
        return self.last * self.mask


class TorchdiffeqSteps(Stepper):
    """torchdiffeq's adaptive step (``_adaptive_step``) on the one loop, our FSAL terminator;
    :meth:`result` as :class:`~contdeq.solvers.integrate.RungeKuttaSteps`'s.

    Args:
        func: the counted right-hand side; ``z``, ``d``: ``(B, D)`` initial state and
            derivative; ``progress``: the solve's bookkeeping; ``method``: a name in
            :data:`TORCHDIFFEQ_FSAL_METHODS`; ``control``: tolerances, steps, ``t_max``.
    """

    def __init__(self, func: CountedODEFunc, z: Tensor, d: Tensor, progress: Progress,
                 method: str, control: StepControl) -> None:
        self.func, self.control = func, control
        self.mask = progress.active.to(z.dtype).unsqueeze(1)
        self.masked = _MaskedFunc(func, self.mask)
        order = TABLEAUX[method].order
        first = control.first_step or initial_step(
            d, z, control.atol, control.rtol, order, min(control.max_step, control.t_max)
        )
        self.norm = _ErrorNorm()
        perturbed = _PerturbFunc(self.masked)
        for name in _all_callback_names:  # what torchdiffeq's odeint would attach
            setattr(perturbed, name, _null_callback)
        self.solver = SOLVERS[method](
            func=perturbed, y0=z, rtol=control.rtol, atol=_error_atol(control.atol, z),
            first_step=first, max_step=control.max_step, norm=self.norm,
        )
        # _before_integrate evaluates f(z0) again (one real, counted call beyond ours): a
        # NaN/Inf there is not silent, even when no step follows (z0 already converged).
        self.solver._before_integrate(torch.tensor([0.0, control.t_max], dtype=torch.float64))
        self.state = self.solver.rk_state
        if not all_finite(self.masked.last):
            raise_nonfinite(func.name, 0, "in torchdiffeq's own evaluation of it")
        self.accepted = self.rejected = 0
        self.trials = NonFiniteTrials(func.name)
        progress.keep_best(z)

    def stop_reason(self, progress: Progress) -> StopReason | str | None:
        reason = progress.stop_reason(self.control.t_max)
        if reason is None and float(self.state.t1) >= self.control.t_max:
            return "t_max"  # progress.t, a sum of steps, may lag t1
        return reason

    def step(self, z: Tensor, progress: Progress) -> tuple[Tensor, bool]:
        control, state, mask = self.control, self.state, self.mask
        mask.copy_(progress.active.unsqueeze(1))
        # k_0 of a just-frozen sample must be 0 too; torchdiffeq's step does not stop at t_max.
        dt = state.dt.clamp(max=control.t_max - float(state.t1))
        state = state._replace(f1=state.f1 * mask, dt=dt)
        try:
            new_state = self.solver._adaptive_step(state)
        except AssertionError as exc:  # underflow in dt (no NaN state is ever accepted)
            raise_step_underflow(f"{self.func.name} ({exc})", progress.steps,
                                 float(state.t1), float(state.dt))
        nonfinite = self.norm.nonfinite
        tol = None
        if float(new_state.t1) > float(state.t1):
            res = sample_rms(new_state.f1)
            tol = progress.trial_tolerance(new_state.y1, res, progress.active)
            if tol is None:  # finite error estimate, NaN/Inf residual: reject after all
                nonfinite = True
                new_state = new_state._replace(y1=state.y1, f1=state.f1, t1=state.t1,
                                               dt=state.dt * NONFINITE_SHRINK)
        if tol is not None:
            self.accepted += 1
            self.trials.reset()
            progress.accept(progress.active, res, tol, float(new_state.t1 - state.t1),
                            new_state.y1)
        else:
            self.rejected += 1
            if nonfinite:
                self.trials.reject(float(state.dt), progress.steps, float(state.t1))
        self.state = new_state
        return new_state.y1, tol is not None

    def restart(self, z: Tensor, progress: Progress) -> None:
        last = self.masked.last = self.func(self.state.t1, z)
        progress.restart(z, sample_rms(last))
        self.state = self.state._replace(y1=z, f1=last)

    def retest(self, z: Tensor, progress: Progress) -> bool:
        last = self.masked.last
        return last is not None and not bool(self.mask.all()) and progress.reopen_stale(
            z, sample_rms(last))

    def resume(self, z: Tensor, progress: Progress) -> None:
        self.state = self.state._replace(f1=self.masked.last)

    def check_stop(self, reason: StopReason | str, progress: Progress) -> None:
        self.trials.check_stop(reason, progress.steps)

    def result(self, z: Tensor, reason: StopReason | str, progress: Progress) -> LoopResult:
        return LoopResult(progress.final_state(z), reason, self.accepted, self.rejected)


def run_odeint_event(
    func: CountedODEFunc,
    z: Tensor,
    d: Tensor,
    progress: Progress,
    method: str,
    control: StepControl,
) -> LoopResult:
    """``torchdiffeq.odeint_event`` with a steady-state event function.

    Step counts are not observable through the public API: ``accepted``/``rejected`` are
    ``None`` and ``progress.steps`` counts event-function calls. The timeout is checked before
    every step (the solve is interrupted and its last accepted state returned).
    """
    last_state = [z]
    norm = _ErrorNorm()
    trials = NonFiniteTrials(func.name)
    step = [0.0, 0.0]  # start and size of the step being tried
    progress.keep_best(z)

    # torchdiffeq bisects the crossing down to a time tolerance equal to the integrator's atol
    # (``1e-38`` for a relative test): once the bracket is below float64's resolution its
    # midpoint repeats an end, whose value is kept here instead of calling ``func`` again.
    seen: dict[float, Tensor] = {}

    def event_fn(t: Tensor, y: Tensor) -> Tensor:
        key = t.tolist()
        known = seen.get(key)
        if known is not None:
            return known
        progress.steps += 1
        res = sample_rms(func(t, y))
        tol = progress.condition.tolerance(y)
        if not all_finite(res + tol):  # f at an accepted (or interpolated) state
            raise_nonfinite(func.name, progress.steps, "in the event function")
        assert progress.best is not None
        progress.best.offer(y, res, tol)
        value = seen[key] = torch.minimum(
            (res - tol).max(), torch.as_tensor(control.t_max, dtype=t.dtype) - t)
        return value

    class _Recorder(torch.nn.Module):
        def forward(self, t: Tensor, y: Tensor) -> Tensor:
            return func(t, y)

        def callback_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
            if norm.nonfinite:  # the previous trial was rejected for NaN/Inf
                trials.reject(step[1], progress.steps, step[0])  # raises after too many
            else:
                trials.reset()
            step[:] = [float(t0), float(dt)]
            if progress.timeout is not None and (
                time.perf_counter() - progress.start >= progress.timeout
            ):
                raise _Timeout

        def callback_accept_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
            last_state[0] = y0

    order = TABLEAUX[method].order
    first = control.first_step or initial_step(
        d, z, control.atol, control.rtol, order, min(control.max_step, control.t_max)
    )
    options = {
        "first_step": first, "max_step": control.max_step, "norm": norm,
        "max_num_steps": progress.max_steps,
    }
    reason = "converged"
    t_event = None
    try:
        t_event, solution = odeint_event(
            _Recorder(), z, torch.tensor(0.0, dtype=torch.float64), event_fn=event_fn,
            method=method, rtol=control.rtol, atol=_error_atol(control.atol, z),
            options=options,
        )
        z_final = solution[-1]
    except _Timeout:
        z_final, reason = last_state[0], "timeout"
    except AssertionError as exc:
        if "max_num_steps" not in str(exc):
            raise_step_underflow(f"{func.name} ({exc})", progress.steps, step[0], step[1])
        z_final, reason = last_state[0], "max_steps"
    if norm.nonfinite:
        trials.count += 1
    trials.check_stop(reason, progress.steps)
    d_final = func(0.0, z_final)
    every = torch.ones_like(progress.active)
    # The crossing of t_max is bisected to a tolerance: it can land a few 1e-9 past t_max.
    dt = None if t_event is None else min(float(t_event), control.t_max)
    progress.active = every  # nothing was frozen: every sample is judged at the final state
    progress.update(z_final, sample_rms(d_final), every, dt)
    if bool((progress.res <= progress.tol).all()):  # judged at the returned state
        reason = "converged"
    elif reason == "converged":
        # The crossing bisected on the interpolant can land just short of the tolerance.
        reason = "t_max" if t_event is not None and float(t_event) >= control.t_max else "event"
    return LoopResult(progress.final_state(z_final), reason)
