"""Tensor-in, tensor-out solvers: steady states of ODEs and fixed points of maps.

Nothing here knows about ``nn.Module`` layers; the layers in :mod:`contdeq` build on it.
"""

from .callback import Restart, StepInfo, Stop
from .dispatch import CONTINUOUS, check_options, option_names, solve
from .errors import ConvergenceError, ConvergenceWarning, NonFiniteError
from .fixed_point import fixed_point
from .gmres import GMRESResult, gmres
from .implicit_ptc import PTCOptions
from .methods import PTC, ImplicitPTC, RungeKutta
from .protocol import FixedPointSolver, SteadyStateSolver
from .registry import FIXED_POINT_METHODS, STEADY_STATE_METHODS, TABLEAUX, Registry, registries
from .root import root
from .stats import LoopResult, Solution, SolverStats, StopReason
from .steady_state import steady_state
from .structure import flatten_states, unflatten_states
from .tableaux import Tableau
from .termination import SteadyStateCondition, sample_rms
from .validation import default_tolerance

__all__ = [
    "CONTINUOUS",
    "FIXED_POINT_METHODS",
    "PTC",
    "STEADY_STATE_METHODS",
    "TABLEAUX",
    "ConvergenceError",
    "ConvergenceWarning",
    "FixedPointSolver",
    "GMRESResult",
    "ImplicitPTC",
    "LoopResult",
    "NonFiniteError",
    "PTCOptions",
    "Registry",
    "Restart",
    "RungeKutta",
    "Solution",
    "SolverStats",
    "SteadyStateCondition",
    "SteadyStateSolver",
    "StepInfo",
    "Stop",
    "StopReason",
    "Tableau",
    "check_options",
    "default_tolerance",
    "fixed_point",
    "flatten_states",
    "gmres",
    "option_names",
    "registries",
    "root",
    "sample_rms",
    "solve",
    "steady_state",
    "unflatten_states",
]
