"""The steady-state methods by name: :func:`steady_state_solver`, the lookup
:func:`~contdeq.solvers.steady_state` dispatches through.

A registered steady-state method is an object following
:class:`~contdeq.solvers.protocol.SteadyStateSolver`, defined and registered in the file of
its stepper: :class:`RungeKutta` (``integrate.py``; a
:class:`~contdeq.solvers.tableaux.Tableau` registered in :data:`TABLEAUX` is run by it),
:class:`ImplicitPTC` (``implicit_ptc.py``) and :class:`PTC` (``ptc.py``). The registry is the
dispatch: ``steady_state`` looks the name up and calls ``run``; nothing else names a method.
This module imports those files, in the order of the registry.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from .implicit_ptc import ImplicitPTC
from .integrate import RungeKutta
from .protocol import SteadyStateSolver
from .ptc import PTC
from .registry import STEADY_STATE_METHODS
from .tableaux import Tableau

__all__ = ["PTC", "ImplicitPTC", "RungeKutta", "steady_state_solver"]


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
    if not isinstance(entry, SteadyStateSolver):
        raise TypeError(
            f"method must be a registered steady-state method name or a solver object with "
            f"name, local_error_control, default_max_step, compilable and run(func, z, d, "
            f"progress, control, hook) (see contdeq.solvers.protocol.SteadyStateSolver), got "
            f"{entry!r:.80}")
    return entry
