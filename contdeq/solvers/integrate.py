"""The lean steady-state loops: an embedded Runge-Kutta pair, and pseudo-transient continuation.

Both stop at the first accepted step whose derivative, which the step computed anyway (FSAL),
meets the steady-state condition: termination costs no extra function evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .counting import CountedODEFunc
from .progress import Progress
from .registry import STEADY_STATE_METHODS
from .rk import RungeKuttaStepper, error_ratio, initial_step, next_step_size
from .stats import LoopResult
from .tableaux import Tableau
from .termination import sample_rms
from .validation import raise_nonfinite


@dataclass(frozen=True)
class StepControl:
    """Integrator settings of a Runge-Kutta solve (see :func:`steady_state`)."""

    atol: float
    rtol: float
    first_step: float | None
    max_step: float
    t_max: float


def run_runge_kutta(
    func: CountedODEFunc,
    z: Tensor,
    d: Tensor,
    progress: Progress,
    tableau: Tableau,
    control: StepControl,
) -> LoopResult:
    """Integrate until steady state; returns ``LoopResult(z, stop_reason, accepted, rejected)``.

    Converged samples are frozen: their stage derivatives are multiplied by zero, so their
    state stays exactly where it converged and their local error is zero.
    """
    stepper = RungeKuttaStepper(tableau)
    cap = min(control.max_step, control.t_max)
    h = control.first_step or initial_step(d, z, control.atol, control.rtol, tableau.order, cap)
    t = 0.0
    accepted = rejected = 0
    mask = None
    while (reason := progress.stop_reason(control.t_max)) is None:
        if progress.n_active < z.shape[0]:
            mask = progress.active.to(z.dtype).unsqueeze(1)
            d = d * mask
        h = min(h, control.max_step, control.t_max - t)
        y1, f1, error = stepper.step(func, t, z, d, h, mask)
        ratio = error_ratio(error, z, y1, control.atol, control.rtol)
        progress.steps += 1
        if ratio != ratio or ratio == float("inf"):
            raise_nonfinite(func.name, progress.steps)
        if ratio <= 1.0:
            accepted += 1
            t += h
            z, d = y1, f1
            progress.update(z, sample_rms(d), progress.active, h)
        else:
            rejected += 1
        h = next_step_size(h, ratio, tableau.order)
        if t + h == t:
            raise_nonfinite(func.name, progress.steps)
    return LoopResult(z, reason, accepted, rejected)


@STEADY_STATE_METHODS.register("ptc")
def run_pseudo_transient(
    func: CountedODEFunc,
    z: Tensor,
    d: Tensor,
    progress: Progress,
    max_step: float,
    t_max: float,
) -> LoopResult:
    """Explicit pseudo-transient continuation: forward Euler with per-sample pseudo-time steps.

    Each sample takes ``z <- z + h_b * dz/dt`` (with ``h_b = 1`` this is exactly the Picard step
    ``z <- f(z)`` of a DEQ). Steps are chosen for reaching the steady state, not for accuracy,
    by switched evolution relaxation (Mulder & Van Leer 1985): a step that shrinks the residual
    is accepted and the next one grows by the shrink ratio (at most 2x, at most ``max_step``); a
    step that does not shrink it is rejected and halved. One function evaluation per step, and
    samples do not slow each other: each has its own step size.

    Returns ``LoopResult(z, stop_reason, accepted, rejected)``, the steps counted over
    (sample, step) pairs.
    """
    h = torch.full_like(progress.res, max_step)
    # Per-sample counts, summed once at the end (fewer tensor operations per step).
    accepted = torch.zeros_like(progress.res, dtype=torch.long)
    attempted = torch.zeros_like(accepted)
    finite_t_max = t_max < math.inf
    assert progress.t is not None
    # The bookkeeping of Progress.update is done here, fused with the step control: the loop's
    # cost on small states is its number of tensor operations.
    while (reason := progress.stop_reason(t_max)) is None:
        active, res = progress.active, progress.res
        # The pseudo-time is float64; the step taken is cast to the state's dtype.
        dt = (torch.minimum(h.to(progress.t.dtype), t_max - progress.t) if finite_t_max
              else h) * active
        z_new = torch.addcmul(z, dt.to(h.dtype).unsqueeze(1), d)
        d_new = func(0.0, z_new)
        progress.steps += 1
        res_new = sample_rms(d_new)
        tol_new = progress.checked_tolerance(z_new, res_new, active)
        ok = (res_new < res).logical_and_(active)
        accepted += ok
        attempted += active
        # Accepted: grow by the shrink ratio (in [1, 2]; NaN only where both residuals are 0,
        # which is never accepted). Rejected: halve. Converged samples' h no longer matters.
        factor = torch.where(ok, (res / res_new).clamp_(1.0, 2.0), 0.5)
        h = factor.mul_(h).clamp_(max=max_step)
        keep = ok.unsqueeze(1)
        z = torch.where(keep, z_new, z)
        d = torch.where(keep, d_new, d)
        progress.accept(ok, res_new, tol_new, dt)
    n_accepted = int(accepted.sum())
    return LoopResult(z, reason, n_accepted, int(attempted.sum()) - n_accepted)
