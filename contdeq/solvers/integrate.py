"""The lean steady-state loops: an embedded Runge-Kutta pair, and pseudo-transient continuation.

Both stop at the first accepted step whose derivative, which the step computed anyway (FSAL),
meets the steady-state condition: termination costs no extra function evaluation.

A trial step whose stages, error estimate or residual are NaN/Inf (e.g. an oversized step of a
stiff flow overflowing ``cosh``) is rejected and shrunk tenfold, not fatal:
:class:`NonFiniteTrials` raises :class:`~contdeq.solvers.errors.NonFiniteError` only after
:data:`MAX_NONFINITE_TRIALS` such trials in a row from one accepted state (the function is not
finite near it), when the step underflows, or when the solve stops right after such trials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .callback import StepHook
from .counting import CountedODEFunc
from .progress import Progress
from .rk import RungeKuttaStepper, error_ratio, initial_step, next_step_size, stage_times
from .stats import LoopResult
from .tableaux import Tableau
from .termination import sample_rms
from .validation import finite_where, raise_nonfinite, raise_step_underflow

#: Consecutive trial steps with NaN/Inf stages, error estimate or residual after which the
#: solve stops: each shrinks the step by :data:`NONFINITE_SHRINK`, so the last is ``1e-29``
#: times the first.
MAX_NONFINITE_TRIALS = 30
#: Factor applied to a trial step rejected for NaN/Inf.
NONFINITE_SHRINK = 0.1
#: Least growth of a ptc step after a step that shrank the residual: the shrink ratio alone
#: (``1 + O(h)``) would take thousands of steps to grow from a small ``first_step``.
PTC_MIN_GROWTH = 1.2
#: ptc accepts a step that raises a sample's residual when the derivative changed by at most
#: this fraction of its norm over the step (the step resolves the flow)...
PTC_SMOOTH_CHANGE = 0.5
#: ... and the residual stays within this factor of the sample's best residual so far.
PTC_GROWTH_CAP = 10.0


class NonFiniteTrials:
    """Counts consecutive trial steps rejected for NaN/Inf and raises when they are not a
    matter of step size.

    Args:
        name: the user's function's name, for the messages.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0

    def reset(self) -> None:
        """A finite step was accepted."""
        self.count = 0

    def reject(self, h: float, step: int, t: float) -> float:
        """One more non-finite trial of step ``h`` from pseudo-time ``t``: the next step size.

        Raises :class:`NonFiniteError` after :data:`MAX_NONFINITE_TRIALS` in a row.
        """
        self.count += 1
        if self.count >= MAX_NONFINITE_TRIALS:
            raise_trials_exhausted(
                self.name, step, self.count,
                f"from the accepted state at pseudo-time t={t:.6g} was NaN/Inf, down to "
                f"h={h:.3g}")
        return h * NONFINITE_SHRINK

    def check_stop(self, reason: str, step: int) -> None:
        """The loop stopped for ``reason``; raise if it stopped right after non-finite trials
        (NaN never passes as a mere non-convergence)."""
        check_stop_after_trials(self.name, step, reason, self.count)


def raise_trials_exhausted(name: str, step: int, count: int, where: str) -> None:
    """Raise :class:`NonFiniteError`: the last ``count`` trial steps ``where`` (how they were
    taken, for the message) were all NaN/Inf."""
    raise_nonfinite(name, step, f"every one of the last {count} trial steps {where}: {name} is "
                                "not finite near that state")


def check_stop_after_trials(name: str, step: int, reason: str, count: int) -> None:
    """Raise :class:`NonFiniteError` when a solve stopped for ``reason`` (not convergence)
    right after ``count > 0`` trial steps rejected for NaN/Inf."""
    if count and reason != "converged":
        raise_nonfinite(
            name, step,
            f"the solve stopped ({reason}) right after {count} trial step(s) rejected "
            "for NaN/Inf, before a finite step was found",
        )


@dataclass(frozen=True)
class StepControl:
    """Integrator settings of a steady-state solve (see :func:`steady_state`)."""

    atol: float
    rtol: float
    first_step: float | None
    max_step: float
    t_max: float
    #: ``"lean"``, ``"torchdiffeq"`` or ``"event"`` (Runge-Kutta pairs).
    backend: str = "lean"
    #: Run each step compiled (methods with ``compilable``).
    compile: bool = False


def run_runge_kutta(
    func: CountedODEFunc,
    z: Tensor,
    d: Tensor,
    progress: Progress,
    tableau: Tableau,
    control: StepControl,
    hook: StepHook | None = None,
) -> LoopResult:
    """Integrate until steady state; returns ``LoopResult(z, stop_reason, accepted, rejected)``.

    Converged samples are frozen: their stage derivatives are multiplied by zero, so their
    state stays exactly where it converged and their local error is zero. When every sample
    has converged, the frozen ones are re-tested on the last step's unmasked evaluation (no
    extra call): a sample that no longer passes (``f`` couples samples) iterates again. A
    sample that stops unconverged returns its best accepted state; until an active sample's
    residual fails to shrink, every sample's best state is its current one, and none is copied.
    """
    stepper = RungeKuttaStepper(tableau)
    cap = min(control.max_step, control.t_max)
    h = control.first_step or initial_step(d, z, control.atol, control.rtol, tableau.order, cap)
    t = 0.0
    accepted = rejected = 0
    trials = NonFiniteTrials(func.name)
    mask = None
    while True:
        # One count of the active samples per step tells both whether to stop and whether to mask.
        while (reason := progress.stop_reason(
                control.t_max, any_active=(n_active := progress.n_active) > 0)) is None:
            if n_active < z.shape[0]:
                mask = progress.active.to(z.dtype).unsqueeze(1)
                d = d * mask
            h = min(h, control.max_step, control.t_max - t)
            times = stage_times(tableau, t, h)
            if len(set(times)) > 2:  # else one tensor per time is no more operations
                func.prepare_times(times)
            y1, f1, error = stepper.step(func, t, z, d, h, mask)
            progress.steps += 1
            ratio = error_ratio(error, z, y1, control.atol, control.rtol)
            tol = None
            if ratio <= 1.0:  # False for NaN
                res = sample_rms(f1)
                tol = progress.condition.tolerance(y1)
                # One sync: finite, and (while no best state is kept) every active sample's
                # residual shrank; ``shrank < active``: active and not shrinking (or NaN).
                probe = res + tol
                if progress.best is None:
                    probe.masked_fill_((res < progress.res) < progress.active, math.nan)
                if not math.isfinite(probe.sum().tolist()):
                    tol = tol if finite_where(res + tol, progress.active) else None
                    if tol is not None and progress.best is None:
                        progress.keep_best(z)  # a residual rose: keep each sample's best
            if tol is not None:
                accepted += 1
                trials.reset()
                t += h
                z, d = y1, f1
                progress.accept(progress.active, res, tol, h, z)
                h = next_step_size(h, ratio, tableau.order)
                if hook is not None and (restart := hook(progress, z)) is not None:
                    z, d, mask = restart, func(t, restart), None
                    progress.restart(z, sample_rms(d))
            elif ratio > 1.0 and math.isfinite(ratio):
                rejected += 1
                h = next_step_size(h, ratio, tableau.order)
            else:  # NaN/Inf in a stage, the error estimate or the residual: shrink, not fatal
                rejected += 1
                h = trials.reject(h, progress.steps, t)
            if t + h == t:
                raise_step_underflow(func.name, progress.steps, t, h)
        trials.check_stop(reason, progress.steps)
        # Frozen samples are re-tested on the last evaluation, which saw them where they froze
        # (an f coupling samples may have moved them off): at a limit they are returned
        # unconverged, when all converged they iterate again.
        if mask is None or stepper.last_evaluation is None or not progress.reopen_stale(
                z, sample_rms(stepper.last_evaluation)) or reason != "converged":
            break
        d, mask = stepper.last_evaluation, None
    return LoopResult(progress.final_state(z), reason, accepted, rejected)


def run_pseudo_transient(
    func: CountedODEFunc,
    z: Tensor,
    d: Tensor,
    progress: Progress,
    control: StepControl,
    hook: StepHook | None = None,
) -> LoopResult:
    """Explicit pseudo-transient continuation: forward Euler with per-sample pseudo-time steps.

    Each sample takes ``z <- z + h_b * dz/dt`` (with ``h_b = 1`` this is exactly the Picard step
    ``z <- f(z)`` of a DEQ). Steps are chosen for reaching the steady state, not for accuracy,
    by switched evolution relaxation (Mulder & Van Leer 1985): a step that shrinks the residual
    is accepted and the next one grows by the shrink ratio (at least :data:`PTC_MIN_GROWTH`, at
most 2x, at most ``max_step``).
    A step that does not shrink it is still accepted when it resolves the flow (the derivative
    changed by at most :data:`PTC_SMOOTH_CHANGE` of its norm) and the residual stays within
    :data:`PTC_GROWTH_CAP` times the sample's best: the residual of a stable non-normal or
    oscillatory flow rises along its trajectory, and a monotone test stalls there. Other steps
    are rejected and shrunk (2-10x; 10x for NaN/Inf). One function evaluation per step, and
    samples do not slow each other: each has its own step size, starting at
    ``control.first_step`` (default ``max_step``). A sample that stops unconverged returns its
    best state.

    Returns ``LoopResult(z, stop_reason, accepted, rejected)``, the steps counted over
    (sample, step) pairs.
    """
    max_step, t_max = control.max_step, control.t_max
    h = torch.full_like(progress.res, min(control.first_step or max_step, max_step))
    # Per-sample counts, summed once at the end (fewer tensor operations per step); rejections
    # are counted on the slow path only.
    rejected = torch.zeros_like(progress.res, dtype=torch.long)
    attempted = torch.zeros_like(rejected)
    finite_t_max = t_max < math.inf
    trials = NonFiniteTrials(func.name)
    res_new = None
    assert progress.t is not None
    while True:
        # The bookkeeping of Progress.update is done here, fused with the step control: the
        # loop's cost on small states is its number of tensor operations.
        while (reason := progress.stop_reason(t_max)) is None:
            active, res = progress.active, progress.res
            # The pseudo-time is float64; the step taken is cast to the state's dtype.
            dt = (torch.minimum(h.to(progress.t.dtype), t_max - progress.t) if finite_t_max
                  else h) * active
            z_new = torch.addcmul(z, dt.to(h.dtype).unsqueeze(1), d)
            d_new = func(0.0, z_new)
            progress.steps += 1
            res_new = sample_rms(d_new)
            tol_new = progress.condition.tolerance(z_new)
            # One sync: finite, and every active sample's residual shrank (the usual case);
            # ``descent < active``: active and not shrinking (or NaN).
            probe = (res_new + tol_new).masked_fill_((res_new < res) < active, math.nan)
            if math.isfinite(probe.sum().tolist()):
                trials.reset()
                # Grow by the shrink ratio, in [1.2, 2] (NaN only where both residuals are 0:
                # frozen samples, whose h no longer matters).
                factor = (res / res_new).clamp_(PTC_MIN_GROWTH, 2.0)
                # Every active sample moves; a frozen one took a step of 0 from a finite
                # state with a finite derivative, so z_new equals z there.
                ok, z = active, z_new
            else:
                ok, factor = _ptc_slow_path(progress, trials, z, d, d_new, res_new, tol_new, h)
                rejected += active.logical_xor(ok)  # ok is a subset of active
                z = torch.where(ok.unsqueeze(1), z_new, z)
            h = factor.mul_(h).clamp_(max=max_step)
            attempted += active
            d = torch.where(ok.unsqueeze(1), d_new, d)
            progress.accept(ok, res_new, tol_new, dt, z)
            if hook is not None and (restart := hook(progress, z)) is not None:
                z, d = restart, func(0.0, restart)
                d_new, res_new = d, sample_rms(d)
                progress.restart(z, res_new)
        trials.check_stop(reason, progress.steps)
        # The last call saw every sample at the final state (frozen ones did not move): frozen
        # samples that no longer pass are returned unconverged at a limit, iterate again when
        # all converged.
        if res_new is None or not progress.reopen_stale(z, res_new) or reason != "converged":
            break
        d = d_new
    n_rejected = int(rejected.sum())
    return LoopResult(progress.final_state(z), reason, int(attempted.sum()) - n_rejected,
                      n_rejected)


def _ptc_slow_path(
    progress: Progress, trials: NonFiniteTrials, z: Tensor, d: Tensor, d_new: Tensor,
    res_new: Tensor, tol_new: Tensor, h: Tensor,
) -> tuple[Tensor, Tensor]:
    """Acceptance and step factors of a ptc step where some active sample's residual did not
    shrink or is NaN/Inf; returns ``(accepted, factor)``, each ``(B,)``."""
    active, res = progress.active, progress.res
    best_res = res if progress.best is None else progress.best.res
    ok, factor, finite, rise = ptc_rule(res, d, res_new, d_new, tol_new, best_res, active)
    if bool(rise.logical_and_(ok).any()) and progress.best is None:
        progress.keep_best(z)  # the residual is no longer monotone: keep each sample's best
    if bool((~finite).logical_and_(active).any()):
        trials.reject(float(h.detach().max()), progress.steps,
                      float(progress.t.detach().max()))  # may raise
    else:
        trials.reset()
    return ok, factor


def ptc_rule(
    res: Tensor, d: Tensor, res_new: Tensor, d_new: Tensor, tol_new: Tensor, best_res: Tensor,
    active: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ptc step rule, branch-free (the eager loop's slow path and the compiled step both
    run it): from the residual norms ``res`` at the state and ``res_new`` at the trial
    (``(B,)``), the derivatives ``d``, ``d_new`` (``(B, D)``), the trial's tolerance and each
    sample's best residual, returns ``(ok, factor, finite, rise)``, each ``(B,)``: which active
    samples accept the trial, the factor of their next step, whether the trial is finite, and
    whether it was accepted although its residual rose (a smooth step within
    :data:`PTC_GROWTH_CAP` of the best)."""
    finite = torch.isfinite(res_new + tol_new)
    descent = res_new < res
    # Relative change of the derivative over the step; <= 1 when the step resolves the flow.
    change = sample_rms(d_new - d).div_(res * PTC_SMOOTH_CHANGE).nan_to_num_(nan=math.inf)
    rise = (change <= 1.0).logical_and_(res_new <= PTC_GROWTH_CAP * best_res)
    rise.logical_and_(~descent)
    ok = (descent | rise).logical_and_(finite).logical_and_(active)
    factor = torch.where(
        descent, (res / res_new).clamp_(PTC_MIN_GROWTH, 2.0),
        torch.where(ok, change.reciprocal().clamp_(1.0, 2.0),
                    (0.9 / change).clamp_(NONFINITE_SHRINK, 0.5)),
    )
    factor = torch.where(finite, factor, NONFINITE_SHRINK)
    return ok, factor, finite, rise
