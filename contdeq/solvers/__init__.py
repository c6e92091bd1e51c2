"""Tensor-in, tensor-out solvers: steady states of ODEs and fixed points of maps.

Nothing here knows about ``nn.Module`` layers; the layers in :mod:`contdeq` build on it.
"""

from .errors import ConvergenceError, ConvergenceWarning, NonFiniteError
from .fixed_point import FIXED_POINT_METHODS, fixed_point
from .gmres import GMRESResult, gmres
from .stats import SolverStats
from .steady_state import STEADY_STATE_METHODS, steady_state
from .structure import flatten_states, unflatten_states
from .termination import SteadyStateCondition, sample_rms

__all__ = [
    "FIXED_POINT_METHODS",
    "STEADY_STATE_METHODS",
    "ConvergenceError",
    "ConvergenceWarning",
    "GMRESResult",
    "NonFiniteError",
    "SolverStats",
    "SteadyStateCondition",
    "fixed_point",
    "flatten_states",
    "gmres",
    "sample_rms",
    "steady_state",
    "unflatten_states",
]
