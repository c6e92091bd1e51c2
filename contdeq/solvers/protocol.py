"""The contract every fixed-point solver of :func:`~contdeq.solvers.fixed_point` implements."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:
    from .callback import StepHook
    from .counting import CountedODEFunc
    from .loop import StepControl
    from .progress import Progress
    from .stats import LoopResult

__all__ = ["FixedPointSolver", "SteadyStateSolver"]


class FixedPointSolver(Protocol):
    """A fixed-point method: proposes the next iterate of ``z = g(z)`` on flat ``(B, D)`` states.

    :func:`~contdeq.solvers.fixed_point` constructs one per solve as
    ``Solver(like, **options)`` (``like``: ``(B, D)`` the initial state, for buffer shapes,
    dtype and device; ``options``: the method's keyword-only options, each validated in
    ``__init__`` with a message naming it; an unknown one raises ``TypeError``). A solver whose
    class sets ``needs_map = True`` is also given ``g=``, the counted map ``(B, D) -> (B, D)``,
    for the extra evaluations it makes (they count in ``stats.nfe``); if it also has a ``map``
    attribute (a callable like ``g``), the loop evaluates its proposals through it, so a solver
    that already evaluated ``g`` at its proposal (a line search) can hand that value back
    instead of paying a second call. Each iteration then calls
    :meth:`propose`; :meth:`reset` when a step callback changed ``g`` or the state (a solver
    without it cannot serve such a callback: ``fixed_point`` raises ``TypeError`` then);
    convergence testing, freezing of converged samples, limits and statistics
    are :func:`~contdeq.solvers.fixed_point`'s job, not the solver's.

    To add a method: write the class in its own module, decorate it with
    ``@FIXED_POINT_METHODS.register("name")`` (:mod:`contdeq.solvers.registry`) and import
    that module in ``fixed_point.py``. Validation, the layers' ``solver=`` and
    ``backward_method=`` choices and the tests' parametrizations pick the name up.
    """

    #: Whether the constructor takes ``g=`` (the counted map); optional, default ``False``.
    needs_map: ClassVar[bool] = False
    #: Whether autograd can record the iterations (no in-place history updates, no inner
    #: autograd calls), so gradients may flow through them (``backward="unrolled"``);
    #: optional, default ``False``.
    differentiable: ClassVar[bool] = False

    def __init__(self, like: Tensor, **options: object) -> None: ...

    def propose(self, z: Tensor, gz: Tensor, residual: Tensor) -> Tensor:
        """The next iterate ``(B, D)`` from ``z``, ``g(z)`` and ``residual = g(z) - z``
        (each ``(B, D)``). Must not modify its arguments in place."""
        ...

    def reset(self) -> None:
        """Forget the history (stored iterates, kept values of ``g``): ``g`` or the state
        changed, and the next :meth:`propose` starts afresh."""
        ...


@runtime_checkable
class SteadyStateSolver(Protocol):
    """A steady-state method of :func:`~contdeq.solvers.steady_state`: what
    :data:`~contdeq.solvers.STEADY_STATE_METHODS` holds (a registered
    :class:`~contdeq.solvers.Tableau` is run by :class:`~contdeq.solvers.RungeKutta`).

    ``steady_state`` validates the arguments, wraps ``func`` (counting, checks), evaluates it
    at ``z0`` and builds the per-sample bookkeeping (``progress``: residuals, tolerances,
    freezing, limits, best iterate); then it calls :meth:`run` and assembles the statistics.
    An optional attribute ``first_step`` (``float | None``) is the first step when the caller
    gives none. To add a method: a :class:`~contdeq.solvers.Stepper` subclass (its
    ``__init__`` and ``step``; the one loop, :func:`~contdeq.solvers.run_loop`, owns the stop
    test, the callback, the final re-test and the result) and an object with these members
    whose ``run`` returns ``run_loop(stepper, z, progress, hook)``, registered with
    ``STEADY_STATE_METHODS.register("name", obj)``; validation, ``steady_state``, the layers'
    ``method=`` option, the backward's ``"ode"`` method and the tests' parametrizations pick
    the name up.
    """

    #: The method's name (statistics, messages).
    name: str
    #: Whether it controls a local error (takes ``ode_atol``/``ode_rtol``).
    local_error_control: bool
    #: Largest step when the caller gives no ``max_step``.
    default_max_step: float = math.inf
    #: Whether it has a compiled loop (``compile=True``).
    compilable: bool = False

    def run(self, func: CountedODEFunc, z: Tensor, d: Tensor, progress: Progress,
            control: StepControl, hook: StepHook | None) -> LoopResult:
        """Step ``z`` (``(B, D)``, ``d = func(0, z)``) until ``progress`` says stop; return the
        final state and stop reason (:meth:`Progress.final_state` gives each unconverged
        sample's best state), counting steps in ``progress.steps`` and calling ``hook`` (when
        given) after every accepted step."""
        ...
