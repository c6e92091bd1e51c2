"""Tensor-in, tensor-out solvers: steady states of ODEs and fixed points of maps.

Nothing here knows about ``nn.Module`` layers; the layers in :mod:`contdeq` build on it.
"""

from .callback import Restart, StepInfo, Stop
from .errors import ConvergenceError, ConvergenceWarning, NonFiniteError
from .fixed_point import fixed_point
from .gmres import GMRESResult, gmres
from .protocol import FixedPointSolver
from .registry import FIXED_POINT_METHODS, STEADY_STATE_METHODS, TABLEAUX, Registry, registries
from .root import root
from .stats import SolverStats, StopReason
from .steady_state import steady_state
from .structure import flatten_states, unflatten_states
from .tableaux import Tableau
from .termination import SteadyStateCondition, sample_rms
from .validation import default_tolerance

__all__ = [
    "FIXED_POINT_METHODS",
    "STEADY_STATE_METHODS",
    "TABLEAUX",
    "ConvergenceError",
    "ConvergenceWarning",
    "FixedPointSolver",
    "GMRESResult",
    "NonFiniteError",
    "Registry",
    "Restart",
    "SolverStats",
    "SteadyStateCondition",
    "StepInfo",
    "Stop",
    "StopReason",
    "Tableau",
    "default_tolerance",
    "fixed_point",
    "flatten_states",
    "gmres",
    "registries",
    "root",
    "sample_rms",
    "steady_state",
    "unflatten_states",
]
