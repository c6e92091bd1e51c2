"""Exceptions and warnings raised by the solvers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from .._warnings import warn

if TYPE_CHECKING:
    from .stats import SolverStats

#: What a solve does when it stops before every sample met its tolerance: ``"ignore"``,
#: ``"warn"`` (a :class:`ConvergenceWarning`) or ``"raise"`` (a :class:`ConvergenceError`).
OnNonConvergence = Literal["ignore", "warn", "raise"]
ON_NONCONVERGENCE_CHOICES = ("ignore", "warn", "raise")


class ConvergenceWarning(RuntimeWarning):
    """A solve stopped before every sample met its tolerance."""


class ConvergenceError(RuntimeError):
    """A solve stopped before every sample met its tolerance (``on_nonconvergence="raise"``).

    The solver statistics of the failed solve are kept in ``stats``.
    """

    def __init__(self, message: str, stats: SolverStats) -> None:
        super().__init__(message)
        self.stats = stats


class NonFiniteError(FloatingPointError):
    """The function produced NaN or Inf; ``step`` is the solver step where it appeared."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def report_nonconvergence(stats: SolverStats, on_nonconvergence: OnNonConvergence) -> None:
    """Warn (:class:`ConvergenceWarning`) or raise (:class:`ConvergenceError`), as
    ``on_nonconvergence`` says, when ``stats`` shows unconverged samples; the message is
    ``stats.method`` and :meth:`SolverStats.summary`."""
    if on_nonconvergence == "ignore" or stats.all_converged:
        return
    message = f"{stats.method} did not converge: {stats.summary()}"
    if on_nonconvergence == "raise":
        raise ConvergenceError(message, stats)
    warn(message, ConvergenceWarning)
