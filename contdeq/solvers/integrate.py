"""Embedded Runge-Kutta pairs to steady state, a stepper of the one loop
(:func:`~contdeq.solvers.loop.run_loop`).

The loop stops at the first accepted step whose derivative, which the step computed anyway
(FSAL), meets the steady-state condition: termination costs no extra function evaluation. A
trial step whose stages, error estimate or residual are NaN/Inf (e.g. an oversized step of a
stiff flow overflowing ``cosh``) is rejected and shrunk tenfold, not fatal (the loop's NaN/Inf
policy, :mod:`contdeq.solvers.loop`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .callback import StepHook
from .counting import CountedODEFunc
from .loop import NonFiniteTrials, StepControl, Stepper, check_steps, run_loop
from .progress import Progress
from .registry import TABLEAUX
from .rk import (
    RungeKuttaStepper,
    error_norm,
    initial_step,
    next_step_size,
    ratio_of_norm,
    stage_times,
)
from .stats import LoopResult, StopReason
from .tableaux import Tableau
from .termination import sample_rms
from .torchdiffeq_backend import TorchdiffeqSteps, run_odeint_event
from .validation import finite_where, raise_step_underflow


class RungeKuttaSteps(Stepper):
    """An embedded pair stepping one solve to steady state, one global step size.

    Converged samples are frozen: their stage derivatives are multiplied by zero, so their
    state stays exactly where it converged and their local error is zero. When the loop stops,
    the frozen ones are re-tested on the last step's unmasked evaluation (no extra call). A
    sample that stops unconverged returns its best accepted state; until an active sample's
    residual fails to shrink, every sample's best state is its current one, and none is copied.

    Args:
        func: the counted right-hand side.
        z: ``(B, D)`` initial state; ``d``: ``(B, D)`` the derivative there.
        progress: the solve's bookkeeping.
        tableau: the pair.
        control: local-error tolerances, first and largest step, ``t_max``.
    """

    def __init__(self, func: CountedODEFunc, z: Tensor, d: Tensor, progress: Progress,
                 tableau: Tableau, control: StepControl) -> None:
        self.func, self.d = func, d
        self.tableau, self.control = tableau, control
        self.stepper = RungeKuttaStepper(tableau)
        cap = min(control.max_step, control.t_max)
        self.h = control.first_step or initial_step(d, z, control.atol, control.rtol,
                                                    tableau.order, cap)
        self.t = 0.0
        self.accepted = self.rejected = 0
        self.trials = NonFiniteTrials(func.name)
        self.mask: Tensor | None = None
        # Samples still active; ``None`` until counted (the step's one host read counts them).
        self.n_active: int | None = None

    def stop_reason(self, progress: Progress) -> StopReason | str | None:
        # One count of the active samples tells both whether to stop and whether to mask.
        if self.n_active is None:
            self.n_active = progress.n_active
        return progress.stop_reason(self.control.t_max, any_active=self.n_active > 0)

    def step(self, z: Tensor, progress: Progress) -> tuple[Tensor, bool]:
        control, tableau, func = self.control, self.tableau, self.func
        if self.n_active < z.shape[0]:
            self.mask = progress.active.to(z.dtype).unsqueeze(1)
            self.d = self.d * self.mask
        t = self.t
        h = min(self.h, control.max_step, control.t_max - t)
        times = stage_times(tableau, t, h)
        if len(set(times)) > 2:  # else one tensor per time is no more operations
            func.prepare_times(times)
        y1, f1, error = self.stepper.step(func, t, z, self.d, h, self.mask)
        # The step's one host read: the error norm; whether the trial is finite and (while no
        # best state is kept) every active sample's residual shrank (``shrank < active``:
        # active and not shrinking, or NaN); and how many samples stay active if it is
        # accepted. The residual and tolerance are computed before the step is judged (wasted
        # only on a rejected step).
        res = sample_rms(f1)
        tol: Tensor | None = progress.condition.tolerance(y1)
        probe = res + tol
        if progress.best is None:
            probe.masked_fill_((res < progress.res) < progress.active, math.nan)
        still = progress.active_after(progress.active, res, tol)
        norm, probe_sum, n_still = torch.stack(
            (error_norm(error, z, y1, control.atol, control.rtol), probe.sum(), still.sum())
        ).tolist()  # a float32 stack at least: the count is exact
        ratio = ratio_of_norm(norm, error.shape[1])
        if not ratio <= 1.0:  # True for NaN
            tol = None
        elif not math.isfinite(probe_sum):
            tol = tol if finite_where(res + tol, progress.active) else None
            if tol is not None and progress.best is None:
                progress.keep_best(z)  # a residual rose: keep each sample's best
        if tol is not None:
            self.accepted += 1
            self.trials.reset()
            self.t = t = t + h
            z, self.d = y1, f1
            progress.accept(progress.active, res, tol, h, z, active=still)
            self.n_active = int(n_still)
            self.h = next_step_size(h, ratio, tableau.order)
        elif ratio > 1.0 and math.isfinite(ratio):
            self.rejected += 1
            self.h = next_step_size(h, ratio, tableau.order)
        else:  # NaN/Inf in a stage, the error estimate or the residual: shrink, not fatal
            self.rejected += 1
            self.h = self.trials.reject(h, progress.steps, t)
        if t + self.h == t:
            raise_step_underflow(func.name, progress.steps, t, self.h)
        return z, tol is not None

    def restart(self, z: Tensor, progress: Progress) -> None:
        self.d, self.mask, self.n_active = self.func(self.t, z), None, None
        progress.restart(z, sample_rms(self.d))

    def retest(self, z: Tensor, progress: Progress) -> bool:
        # Frozen samples are re-tested on the last evaluation, which saw them where they froze
        # (an f coupling samples may have moved them off).
        last = self.stepper.last_evaluation
        return self.mask is not None and last is not None and progress.reopen_stale(
            z, sample_rms(last))

    def resume(self, z: Tensor, progress: Progress) -> None:
        assert self.stepper.last_evaluation is not None
        self.d, self.mask, self.n_active = self.stepper.last_evaluation, None, None

    def check_stop(self, reason: StopReason | str, progress: Progress) -> None:
        self.trials.check_stop(reason, progress.steps)

    def result(self, z: Tensor, reason: StopReason | str, progress: Progress) -> LoopResult:
        return LoopResult(progress.final_state(z), reason, self.accepted, self.rejected)


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
        self.first_step, self.default_max_step = check_steps(first_step, max_step)

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
