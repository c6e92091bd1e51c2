"""The same steady-state solve on torchdiffeq's machinery, for comparison.

* ``backend="torchdiffeq"`` drives torchdiffeq's own Runge-Kutta loop
  (``RKAdaptiveStepsizeODESolver._adaptive_step``, an internal of torchdiffeq 0.2) and stops on
  its FSAL derivative, freezing converged samples by masking the derivative.
* ``backend="event"`` uses only torchdiffeq's public API, ``odeint_event``: the event function
  ``max_b(||dz_b/dt|| - tol_b)`` must evaluate f again at every accepted step, and the crossing
  time is then located by bisection on the dense-output interpolant (more evaluations).
  Samples are not frozen.

Both are slower than the lean loop (see ``benchmarks/solvers.py``); they exist so that the lean
loop can be checked and measured against them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchdiffeq import odeint_event
from torchdiffeq._impl.misc import _all_callback_names, _null_callback, _PerturbFunc
from torchdiffeq._impl.odeint import SOLVERS

from .counting import CountedODEFunc
from .integrate import StepControl
from .progress import Progress
from .rk import initial_step
from .stats import LoopResult
from .tableaux import TABLEAUX
from .termination import sample_rms
from .validation import raise_nonfinite

#: Methods whose torchdiffeq loop returns the derivative at the new state (FSAL pairs).
TORCHDIFFEQ_FSAL_METHODS = ("dopri5", "bosh3", "dopri8")
#: Methods torchdiffeq 0.2 offers that ``odeint_event`` can run.
EVENT_METHODS = ("dopri5", "bosh3", "dopri8", "adaptive_heun")


def _max_sample_rms(x: Tensor) -> Tensor:
    flat = x.reshape(x.shape[0], -1)
    return (torch.linalg.vector_norm(flat, dim=1) / (flat.shape[1] ** 0.5)).max()


class _MaskedFunc(torch.nn.Module):
    """``mask * func(t, z)``; ``mask`` is updated in place as samples converge."""

    def __init__(self, func: CountedODEFunc, mask: Tensor) -> None:
        super().__init__()
        self.func = func
        self.mask = mask

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.func(t, z) * self.mask


def run_torchdiffeq_loop(
    func: CountedODEFunc,
    z: Tensor,
    d: Tensor,
    progress: Progress,
    method: str,
    control: StepControl,
) -> LoopResult:
    """torchdiffeq's adaptive step, our FSAL terminator; returns like ``run_runge_kutta``."""
    mask = progress.active.to(z.dtype).unsqueeze(1)
    masked = _MaskedFunc(func, mask)
    order = TABLEAUX[method].order
    first = control.first_step or initial_step(
        d, z, control.atol, control.rtol, order, min(control.max_step, control.t_max)
    )
    perturbed = _PerturbFunc(masked)
    for name in _all_callback_names:  # what torchdiffeq's odeint would attach
        setattr(perturbed, name, _null_callback)
    solver = SOLVERS[method](
        func=perturbed, y0=z, rtol=control.rtol, atol=control.atol,
        first_step=first, max_step=control.max_step, norm=_max_sample_rms,
    )
    # _before_integrate evaluates f(z0) again (one real, counted call beyond ours).
    solver._before_integrate(torch.tensor([0.0, control.t_max], dtype=torch.float64))
    state = solver.rk_state
    accepted = rejected = 0
    while (reason := progress.stop_reason(control.t_max)) is None:
        if float(state.t1) >= control.t_max:  # progress.t, a sum of steps, may lag t1 by an ulp
            reason = "t_max"
            break
        mask.copy_(progress.active.unsqueeze(1))
        # k_0 of a just-frozen sample must be 0 too; torchdiffeq's step does not stop at t_max.
        dt = state.dt.clamp(max=control.t_max - float(state.t1))
        state = state._replace(f1=state.f1 * mask, dt=dt)
        try:
            new_state = solver._adaptive_step(state)
        except AssertionError as exc:  # underflow in dt, or non-finite state
            raise_nonfinite(f"{func.name} ({exc})", progress.steps + 1)
        progress.steps += 1
        if float(new_state.t1) > float(state.t1):
            accepted += 1
            dt = float(new_state.t1 - state.t1)
            progress.update(new_state.y1, sample_rms(new_state.f1), progress.active, dt)
        else:
            rejected += 1
            # A non-finite stage rejects the step with a NaN next step size; torchdiffeq only
            # notices at the next step, which max_steps may never allow.
            if not math.isfinite(float(new_state.dt)):
                raise_nonfinite(func.name, progress.steps)
        state = new_state
    return LoopResult(state.y1, reason, accepted, rejected)


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
    ``None`` and ``progress.steps`` counts event-function calls.
    """
    condition = progress.condition
    last_state = [z]

    def event_fn(t: Tensor, y: Tensor) -> Tensor:
        progress.steps += 1
        res, tol, _ = condition.evaluate(y, func(t, y))
        return torch.minimum((res - tol).max(), torch.as_tensor(control.t_max, dtype=t.dtype) - t)

    class _Recorder(torch.nn.Module):
        def forward(self, t: Tensor, y: Tensor) -> Tensor:
            return func(t, y)

        def callback_accept_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
            last_state[0] = y0

    order = TABLEAUX[method].order
    first = control.first_step or initial_step(
        d, z, control.atol, control.rtol, order, min(control.max_step, control.t_max)
    )
    options = {
        "first_step": first, "max_step": control.max_step, "norm": _max_sample_rms,
        "max_num_steps": progress.max_steps,
    }
    reason = "converged"
    try:
        t_event, solution = odeint_event(
            _Recorder(), z, torch.tensor(0.0, dtype=torch.float64), event_fn=event_fn,
            method=method, rtol=control.rtol, atol=control.atol, options=options,
        )
        z_final = solution[-1]
    except AssertionError as exc:
        if "max_num_steps" not in str(exc):
            raise_nonfinite(f"{func.name} ({exc})", progress.steps)
        z_final, reason = last_state[0], "max_steps"
        t_event = None
    d_final = func(0.0, z_final)
    every = torch.ones_like(progress.active)
    dt = None if t_event is None else float(t_event)
    progress.active = every  # nothing was frozen: every sample is judged at the final state
    progress.update(z_final, sample_rms(d_final), every, dt)
    if bool((progress.res <= progress.tol).all()):  # judged at the returned state
        reason = "converged"
    elif reason == "converged":
        # The crossing bisected on the interpolant can land just short of the tolerance.
        reason = "t_max" if t_event is not None and float(t_event) >= control.t_max else "event"
    return LoopResult(z_final, reason)
