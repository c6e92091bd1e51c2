"""The one solver loop, and its NaN/Inf policy.

Every steady-state and fixed-point method of this package is a :class:`Stepper`: an object
built for one solve (its ``__init__`` is the method's *init*: step sizes, history, counters)
that takes one step at a time (:meth:`Stepper.step`) and says when its own limits are reached
(:meth:`Stepper.stop_reason`, the *terminate* test, which asks the shared
:class:`~contdeq.solvers.progress.Progress` first). :func:`run_loop` drives every one of them
and alone owns:

* the step count (``progress.steps``) and the order of the stop test, the step and the step
  callback (:class:`~contdeq.solvers.callback.StepHook`, with its ``Restart``);
* the final re-test of frozen samples when the loop stops (:meth:`Progress.reopen_stale` on
  the last evaluation, which saw every sample): at a limit a sample that no longer passes is
  returned unconverged, when every sample had converged it iterates again;
* the NaN/Inf check at the stop (:meth:`Stepper.check_stop`) and the final state
  (:meth:`Stepper.result`: each unconverged sample's best iterate).

Per-sample freezing, residuals, tolerances, limits and the best iterate are
:class:`~contdeq.solvers.progress.Progress`'s; the step rule (and which samples accept a trial)
is the stepper's.

**The NaN/Inf policy** (one, for every method with a step size): a trial step whose stages,
error estimate or residual are NaN/Inf is rejected and its step shrunk tenfold
(:data:`NONFINITE_SHRINK`); :class:`NonFiniteTrials` raises
:class:`~contdeq.solvers.errors.NonFiniteError` after :data:`MAX_NONFINITE_TRIALS` such trials
in a row from one accepted state (the function is not finite near it), and when the solve
stops at a limit right after such trials (NaN never passes as a mere non-convergence). The
fixed-point methods have no step to shrink: a NaN/Inf residual raises at once. ``implicit_ptc``
shrinks a rejected step by its own ``PTCOptions.rejection_shrink`` and raises at the stop when
an unconverged sample's last trials were NaN/Inf (its linear solves make a trial per sample).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .callback import StepHook
from .progress import Progress
from .stats import LoopResult, StopReason
from .validation import check_positive_float, raise_nonfinite

__all__ = ["MAX_NONFINITE_TRIALS", "NONFINITE_SHRINK", "NonFiniteTrials", "StepControl",
           "Stepper", "run_loop"]

#: Consecutive trial steps with NaN/Inf stages, error estimate or residual after which the
#: solve stops: each shrinks the step by :data:`NONFINITE_SHRINK`, so the last is ``1e-29``
#: times the first.
MAX_NONFINITE_TRIALS = 30
#: Factor applied to a trial step rejected for NaN/Inf.
NONFINITE_SHRINK = 0.1


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


class Stepper:
    """One solve's method state, stepped by :func:`run_loop` on flat ``(B, D)`` states.

    A method's steady-state ``run`` (or ``fixed_point``) builds one per solve: its
    ``__init__`` is the method's *init* (step sizes, history, counters; it keeps what it needs
    between steps, such as the derivative at the current state), and the loop passes only the
    state ``z`` and the shared ``progress``. Subclasses implement :meth:`step`; the other
    members have defaults for a method that freezes nothing by itself, keeps no extra state to
    re-test and has no NaN/Inf trials to account for.
    """

    def stop_reason(self, progress: Progress) -> StopReason | str | None:
        """Why the loop must stop before the next step (``progress.stop_reason`` plus the
        method's own limits), or ``None``."""
        return progress.stop_reason()

    def step(self, z: Tensor, progress: Progress) -> tuple[Tensor, bool]:
        """One step from ``z`` (``progress.steps`` already counts it): record the residuals
        in ``progress``; return the new state and whether the step callback runs now (after
        an accepted step)."""
        raise NotImplementedError

    def restart(self, z: Tensor, progress: Progress) -> None:
        """A step callback replaced the state (or the function) with ``z``: evaluate there,
        judge every sample afresh (``progress.restart``), forget the history."""
        raise TypeError(f"{type(self).__name__} cannot restart from a step callback's "
                        "Restart (it has no restart())")

    def retest(self, z: Tensor, progress: Progress) -> bool:
        """Re-test the frozen samples on the last evaluation (``progress.reopen_stale``);
        ``True`` when some no longer pass (default: ``False``, nothing to re-test)."""
        return False

    def resume(self, z: Tensor, progress: Progress) -> None:
        """Go on from ``z`` after :meth:`retest` reopened samples."""

    def check_stop(self, reason: StopReason | str, progress: Progress) -> None:
        """Raise :class:`NonFiniteError` when the loop stopped for ``reason`` right after
        NaN/Inf trials (default: nothing to check)."""

    def result(self, z: Tensor, reason: StopReason | str, progress: Progress) -> LoopResult:
        """The :class:`LoopResult` of a loop that stopped at ``z`` for ``reason`` (default:
        each unconverged sample's best iterate, when ``progress`` keeps one)."""
        return LoopResult(progress.final_state(z), reason)


def run_loop(stepper: Stepper, z: Tensor, progress: Progress,
             hook: StepHook | None = None) -> LoopResult:
    """Step ``z`` (``(B, D)``) with ``stepper`` until ``progress`` or the stepper says stop,
    calling ``hook`` after every step the stepper reports; re-test the frozen samples at the
    stop (they iterate again when all had converged) and return the stepper's result."""
    while True:
        while (reason := stepper.stop_reason(progress)) is None:
            progress.steps += 1
            z, call_hook = stepper.step(z, progress)
            if call_hook and hook is not None and (restart := hook(progress, z)) is not None:
                z = restart
                stepper.restart(z, progress)
        stepper.check_stop(reason, progress)
        if not stepper.retest(z, progress) or reason != StopReason.CONVERGED:
            return stepper.result(z, reason, progress)
        stepper.resume(z, progress)


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

    def check_stop(self, reason: StopReason | str, step: int) -> None:
        """The loop stopped for ``reason``; raise if it stopped right after non-finite trials
        (NaN never passes as a mere non-convergence)."""
        check_stop_after_trials(self.name, step, reason, self.count)


def raise_trials_exhausted(name: str, step: int, count: int, where: str) -> None:
    """Raise :class:`NonFiniteError`: the last ``count`` trial steps ``where`` (how they were
    taken, for the message) were all NaN/Inf."""
    raise_nonfinite(name, step, f"every one of the last {count} trial steps {where}: {name} is "
                                "not finite near that state")


def check_stop_after_trials(name: str, step: int, reason: StopReason | str, count: int) -> None:
    """Raise :class:`NonFiniteError` when a solve stopped for ``reason`` (not convergence)
    right after ``count > 0`` trial steps rejected for NaN/Inf."""
    if count and reason != "converged":
        raise_nonfinite(
            name, step,
            f"the solve stopped ({reason}) right after {count} trial step(s) rejected "
            "for NaN/Inf, before a finite step was found",
        )


def check_steps(first_step: float | None, max_step: float) -> tuple[float | None, float]:
    """Checked ``(first_step, max_step)`` of a steady-state solver object."""
    if first_step is not None:
        first_step = check_positive_float(first_step, "first_step")
    return first_step, check_positive_float(max_step, "max_step", allow_inf=True)
