"""Keyword spellings renamed for one word per concept (tolerances ``atol``/``rtol``, limits
``max_steps``): the old spelling keeps working for one release with a ``DeprecationWarning``
that names the new one, attributed to the user's line (:func:`contdeq._warnings.renamed`)."""

from __future__ import annotations

from .._warnings import renamed

__all__ = ["RENAMED", "renamed"]

#: ``(where, old keyword) -> new keyword(s)`` of every renamed keyword (layers, backward modes,
#: functions and the federated solver budget alike).
RENAMED = {
    ("DEQ", "backward_tol"): "backward_rtol",
    ("NeuralODE", "max_num_steps"): "max_steps",
    ("Implicit", "tol"): "rtol",
    ("WarmImplicit", "tol"): "rtol",
    ("solve_adjoint", "tol"): "rtol",
    ("SolverBudget", "tol"): "atol, rtol",
}
