"""Gradients of an equilibrium ``z* = f(z*, x)`` without backpropagating through the solver.

By the implicit function theorem, for a loss ``L(z*)`` with ``v = dL/dz*``::

    w = (I - J)^-T v,   J = df/dz at (z*, x)      i.e.  w = J^T w + v
    dL/dtheta = w^T df/dtheta,   dL/dx = w^T df/dx

:class:`ImplicitFunction` is one ``torch.autograd.Function`` that wraps any forward solver
(:class:`ForwardSolver`): its forward runs the solver under ``no_grad`` and saves only ``z*``
(and references to ``x`` and ``f``'s parameters, which exist anyway); its backward rebuilds the
graph of one ``f(z*, x)`` call, asks the backward mode for ``w`` (:class:`Implicit` solves
``w = J^T w + v`` with vector-Jacobian products, :func:`solve_adjoint`), and takes one more VJP
for the parameters and ``x``. Memory is independent of the number of solver steps.

The package, by job:

* ``options.py``: :class:`ForwardSolver`, ``FORWARD_SOLVERS``, solver option validation;
* ``backward.py``: the backward modes (:class:`Implicit`, :class:`JFB`, :class:`Unrolled`,
  ``BACKWARD_MODES``, ``BACKWARD_METHODS``, :func:`backward_mode`) and :func:`solve_adjoint`;
* ``phantom.py``: :class:`Phantom` (phantom gradients: ``k`` damped steps from ``z*``);
* ``warm_start.py``: :class:`WarmImplicit` (the implicit backward, warm-started);
* ``function.py``: :class:`ImplicitFunction` and :func:`equilibrium`;
* ``diagnostics.py``: checks of the user's ``f`` (:func:`first_call`, :func:`check_output`);
* ``stats.py``: :class:`DEQStats`.
"""

from .backward import (
    BACKWARD_METHODS,
    BACKWARD_MODES,
    JFB,
    BackwardConfig,
    BackwardMode,
    Implicit,
    Unrolled,
    backward_mode,
    solve_adjoint,
)
from .diagnostics import check_output, first_call
from .function import DoubleBackwardError, ImplicitFunction, equilibrium, trainable_parameters
from .options import FORWARD_SOLVERS, UNROLLABLE_SOLVERS, ForwardSolver
from .phantom import Phantom
from .stats import DEQStats
from .warm_start import WarmImplicit

__all__ = [
    "BACKWARD_METHODS",
    "BACKWARD_MODES",
    "FORWARD_SOLVERS",
    "JFB",
    "UNROLLABLE_SOLVERS",
    "BackwardConfig",
    "BackwardMode",
    "DEQStats",
    "DoubleBackwardError",
    "ForwardSolver",
    "Implicit",
    "ImplicitFunction",
    "Phantom",
    "Unrolled",
    "WarmImplicit",
    "backward_mode",
    "check_output",
    "equilibrium",
    "first_call",
    "solve_adjoint",
    "trainable_parameters",
]
