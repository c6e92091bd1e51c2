"""Explicit pseudo-transient continuation (``method="ptc"``), a stepper of the one loop
(:func:`~contdeq.solvers.loop.run_loop`), and its step rule :func:`ptc_rule` (also compiled
by :mod:`contdeq.solvers.compiled`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .callback import StepHook
from .counting import CountedODEFunc
from .loop import NONFINITE_SHRINK, NonFiniteTrials, StepControl, Stepper, check_steps, run_loop
from .progress import Progress
from .registry import STEADY_STATE_METHODS
from .stats import LoopResult, StopReason
from .termination import sample_rms
from .validation import check_positive_int

#: Least growth of a ptc step after a step that shrank the residual: the shrink ratio alone
#: (``1 + O(h)``) would take thousands of steps to grow from a small ``first_step``.
PTC_MIN_GROWTH = 1.2
#: ptc accepts a step that raises a sample's residual when the derivative changed by at most
#: this fraction of its norm over the step (the step resolves the flow)...
PTC_SMOOTH_CHANGE = 0.5
#: ... and the residual stays within this factor of the sample's best residual so far.
PTC_GROWTH_CAP = 10.0


class PseudoTransientSteps(Stepper):
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

    Args:
        func: the counted right-hand side.
        z: ``(B, D)`` initial state; ``d``: ``(B, D)`` the derivative there.
        progress: the solve's bookkeeping.
        control: ``max_step``, ``t_max`` and ``first_step`` (default ``max_step``).

    :meth:`result` counts the steps over (sample, step) pairs.
    """

    def __init__(self, func: CountedODEFunc, z: Tensor, d: Tensor, progress: Progress,
                 control: StepControl) -> None:
        assert progress.t is not None
        self.func, self.d = func, d
        self.max_step, self.t_max = control.max_step, control.t_max
        self.first = min(control.first_step or self.max_step, self.max_step)
        self.h = torch.full_like(progress.res, self.first)
        # Per-sample counts, summed once at the end (fewer tensor operations per step);
        # rejections are counted on the slow path only.
        self.rejected = torch.zeros_like(progress.res, dtype=torch.long)
        self.attempted = torch.zeros_like(self.rejected)
        self.trials = NonFiniteTrials(func.name)
        # The last evaluation and its residual norms: it saw every sample (frozen ones did not
        # move), so the final re-test uses it.
        self.d_new: Tensor | None = None
        self.res_new: Tensor | None = None
        # ... and the tolerances there (a frozen sample's state did not move: they are its).
        self.tol_new: Tensor | None = None
        # What a frozen and a not shrinking sample contribute to the step's probe (made once:
        # a Python scalar in ``torch.where`` is one more tensor operation per step).
        self.frozen = torch.full((), -math.inf, dtype=progress.res.dtype, device=z.device)
        self.nan = torch.full((), math.nan, dtype=progress.res.dtype, device=z.device)
        self.zero = torch.zeros((), dtype=progress.res.dtype, device=z.device)

    def stop_reason(self, progress: Progress) -> StopReason | str | None:
        return progress.stop_reason(self.t_max)

    def step(self, z: Tensor, progress: Progress) -> tuple[Tensor, bool]:
        # The bookkeeping of Progress.update is done here, fused with the step control: the
        # loop's cost on small states is its number of tensor operations.
        active, res, h = progress.active, progress.res, self.h
        assert progress.t is not None
        # The pseudo-time is float64; the step taken is cast to the state's dtype. A frozen
        # sample steps by exactly 0 whatever its h (NaN for a sample frozen at a residual of
        # exactly 0: its growth factor below is 0 / 0).
        dt = torch.where(active, torch.minimum(h.to(progress.t.dtype), self.t_max - progress.t)
                         if self.t_max < math.inf else h, self.zero)
        z_new = torch.addcmul(z, dt.to(h.dtype).unsqueeze(1), self.d)
        d_new = self.func(0.0, z_new)
        res_new = sample_rms(d_new)
        tol_new = progress.condition.tolerance(z_new)
        # The step's one sync: every active sample finite with a shrinking residual (the usual
        # case; an active sample not shrinking, or NaN, makes the probe NaN), and whether any
        # stays active (its residual above its tolerance; frozen samples count as -inf).
        gap = torch.where(res_new < res, res_new - tol_new, self.nan)
        probe = torch.where(active, gap, self.frozen).amax().tolist()
        if math.isfinite(probe):
            self.trials.reset()
            # Grow by the shrink ratio, in [1.2, 2] (NaN only where both residuals are 0:
            # frozen samples, whose h no longer matters). Step sizes are not differentiated
            # (as the Runge-Kutta pairs' are not): through a residual of exactly 0 the
            # ratio's derivative is 0 / 0, which an unrolled backward spread to every input.
            with torch.no_grad():
                factor = (res / res_new).clamp_(PTC_MIN_GROWTH, 2.0)
            # Every active sample moves; a frozen one took a step of 0 from a finite state with
            # a finite derivative, so z_new equals z there.
            ok, z, any_active, still = active, z_new, probe > 0, None
        else:
            ok, factor, still, any_active = _ptc_slow_path(
                progress, self.trials, z, self.d, d_new, res_new, tol_new, h)
            self.rejected += active.logical_xor(ok)  # ok is a subset of active
            z = torch.where(ok.unsqueeze(1), z_new, z)
        self.h = factor.mul_(h).clamp_(max=self.max_step)
        self.attempted += active
        self.d = torch.where(ok.unsqueeze(1), d_new, self.d)
        progress.accept(ok, res_new, tol_new, dt, z, any_active=any_active, active=still)
        self.d_new, self.res_new, self.tol_new = d_new, res_new, tol_new
        return z, True

    def restart(self, z: Tensor, progress: Progress) -> None:
        self.d = self.d_new = self.func(0.0, z)
        self.res_new = sample_rms(self.d)
        progress.restart(z, self.res_new)
        self.tol_new = progress.tol  # every sample's, at z

    def retest(self, z: Tensor, progress: Progress) -> bool:
        return self.res_new is not None and progress.reopen_stale(z, self.res_new, self.tol_new)

    def resume(self, z: Tensor, progress: Progress) -> None:
        assert self.d_new is not None
        self.d = self.d_new
        # A reopened sample frozen at a residual of exactly 0 has h = NaN: it starts afresh.
        self.h = torch.nan_to_num(self.h, nan=self.first)

    def check_stop(self, reason: StopReason | str, progress: Progress) -> None:
        self.trials.check_stop(reason, progress.steps)

    def result(self, z: Tensor, reason: StopReason | str, progress: Progress) -> LoopResult:
        n_rejected = self.rejected.sum().tolist()
        return LoopResult(progress.final_state(z), reason,
                          self.attempted.sum().tolist() - n_rejected, n_rejected)


def _ptc_slow_path(
    progress: Progress, trials: NonFiniteTrials, z: Tensor, d: Tensor, d_new: Tensor,
    res_new: Tensor, tol_new: Tensor, h: Tensor,
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Acceptance and step factors of a ptc step where some active sample's residual did not
    shrink or is NaN/Inf; returns ``(accepted, factor, still)``, each ``(B,)`` (``still``: the
    samples active after the step), and whether any sample is still active."""
    active, res = progress.active, progress.res
    best_res = res if progress.best is None else progress.best.res
    with torch.no_grad():  # step sizes are not differentiated (see PseudoTransientSteps.step)
        ok, factor, finite, rise = ptc_rule(res, d, res_new, d_new, tol_new, best_res, active)
    still = progress.active_after(ok, res_new, tol_new)
    # One host read for the three questions (the step's second, after its probe).
    rose, nonfinite, any_active = torch.stack((
        rise.logical_and_(ok).any(), (~finite).logical_and_(active).any(), still.any())).tolist()
    if rose and progress.best is None:
        progress.keep_best(z)  # the residual is no longer monotone: keep each sample's best
    if nonfinite:
        trials.reject(float(h.detach().nan_to_num().max()), progress.steps,
                      float(progress.t.detach().max()))  # may raise
    else:
        trials.reset()
    return ok, factor, still, any_active


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


class PTC:
    """Explicit pseudo-transient continuation
    (:class:`PseudoTransientSteps` on the one loop); ``control.compile``
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
        self.first_step, self.default_max_step = check_steps(first_step, max_step)
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


STEADY_STATE_METHODS.register("ptc", PTC())
