"""One dispatch from an equilibrium solver choice to its solve, and the options it takes.

A layer's forward solver, the implicit backward's linear solve and joint inference all choose
between ``"ode"`` (the steady state of ``dz/dt = f(z) - z`` by
:func:`~contdeq.solvers.steady_state`) and a fixed-point method (``z = f(z)`` by
:func:`~contdeq.solvers.fixed_point`). :func:`solve` is that choice, written once; the options
each choice accepts are read from the signatures of those functions and of the fixed-point
solver class (:func:`option_names`), never from a copied list.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .counting import BoundInput, Residual
from .fixed_point import fixed_point
from .registry import FIXED_POINT_METHODS
from .stats import Solution
from .steady_state import steady_state, steady_state_solver

__all__ = ["CONTINUOUS", "BoundInput", "check_options", "option_names", "solve"]

#: The solver choice that integrates the continuous dynamics (:func:`steady_state`).
CONTINUOUS = "ode"
#: Arguments the dispatch supplies itself: the function and state of :func:`steady_state`,
#: of :func:`fixed_point` (and its method name), of a fixed-point solver class.
_SUPPLIED = {"steady_state": frozenset({"func", "z0"}),
             "fixed_point": frozenset({"g", "z0", "method", "options"}),
             "__init__": frozenset({"self", "like", "g"})}

State = Tensor | tuple[Tensor, ...]


def solve(solver: str, fx: Callable[[State], State], z0: State, **options: Any) -> Solution:
    """Find ``z = fx(z)`` from ``z0`` (``(B, ...)`` or a tuple of such) with ``solver``:
    ``"ode"`` integrates ``dz/dt = fx(z) - z`` with :func:`steady_state`, a fixed-point method
    name iterates ``fx`` with :func:`fixed_point`; ``options`` are that function's keywords.
    Returns the :class:`~contdeq.solvers.Solution` ``(z, stats)``, ``z`` shaped like ``z0``.

    Each call of ``fx`` goes through one counted wrapper (for ``"ode"`` it subtracts ``z``
    itself); an ``fx`` that is a :class:`~contdeq.solvers.counting.BoundInput` ``f(., x)`` has
    its ``f`` called from there directly."""
    if solver == CONTINUOUS:
        return steady_state(Residual(fx), z0, **options)
    return fixed_point(fx, z0, method=solver, **options)


def _keywords(fn: Callable[..., Any]) -> list[str]:
    supplied = _SUPPLIED[fn.__name__]
    return [name for name, p in inspect.signature(fn).parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name not in supplied]


def _takes_any(fn: Callable[..., Any]) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def option_names(solver: str) -> tuple[str, ...]:
    """The options ``solver`` accepts (besides ``on_nonconvergence``): the keywords of
    :func:`steady_state` for ``"ode"``; of :func:`fixed_point` and of the method's solver class
    otherwise."""
    if solver == CONTINUOUS:
        names = _keywords(steady_state)
    else:
        names = _keywords(fixed_point) + _keywords(FIXED_POINT_METHODS[solver].__init__)
    return tuple(n for n in names if n != "on_nonconvergence")


def check_options(solver: str, options: Mapping[str, Any]) -> None:
    """Reject unknown option names of ``solver`` (``"ode"`` or a fixed-point method) with a
    ``TypeError`` naming them and the accepted ones; check a ``method`` option of ``"ode"`` and
    the values of a fixed-point method's own options (its class validates them on
    construction; built here on a ``meta`` tensor, no memory)."""
    accepted = option_names(solver)
    unknown = sorted(set(options) - set(accepted))
    if unknown and solver != CONTINUOUS and _takes_any(FIXED_POINT_METHODS[solver].__init__):
        unknown = []  # the class takes **options and validates the names itself
    if unknown:
        owner = "steady_state" if solver == CONTINUOUS else "it"
        raise TypeError(f"unknown option(s) {unknown} for solver={solver!r}; {owner} accepts "
                        f"{sorted(accepted)}")
    if solver == CONTINUOUS:
        if "method" in options:

            steady_state_solver(options["method"])
        return
    solver_class = FIXED_POINT_METHODS[solver]
    own = set(_keywords(solver_class.__init__))
    method_options = {k: v for k, v in options.items() if k in own}
    if getattr(solver_class, "needs_map", False):
        method_options["g"] = lambda z: z
    solver_class(torch.empty(1, 1, device="meta"), **method_options)
