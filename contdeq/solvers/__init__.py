"""Tensor-in, tensor-out solvers: steady states of ODEs and fixed points of maps.

Nothing here knows about ``nn.Module`` layers; the layers in :mod:`contdeq` build on it.
Other packages use only the names exported here and :mod:`contdeq.solvers.validation` (the
one module of argument checks); the other submodules are internal
(``tests/test_public_api.py`` checks it).
"""

from . import validation
from .callback import Restart, StepCallback, StepInfo, Stop
from .dispatch import CONTINUOUS, BoundInput, check_options, option_names, solve
from .errors import (
    ConvergenceError,
    ConvergenceWarning,
    NonFiniteError,
    OnNonConvergence,
    report_nonconvergence,
)
from .fixed_point import fixed_point
from .gmres import GMRESResult, gmres
from .implicit_ptc import ImplicitPTC, PTCOptions
from .integrate import RungeKutta
from .loop import Stepper, run_loop
from .protocol import FixedPointSolver, SteadyStateSolver
from .ptc import PTC
from .registry import FIXED_POINT_METHODS, STEADY_STATE_METHODS, TABLEAUX, Registry, registries
from .rk import initial_step
from .root import root
from .stats import LoopResult, Solution, SolverStats, StopReason
from .steady_state import steady_state
from .structure import concat_states, flatten_states, split_states, unflatten_states
from .tableaux import Tableau
from .termination import SteadyStateCondition, sample_rms
from .validation import default_tolerance, function_precision

__all__ = [
    "CONTINUOUS",
    "FIXED_POINT_METHODS",
    "PTC",
    "STEADY_STATE_METHODS",
    "TABLEAUX",
    "BoundInput",
    "ConvergenceError",
    "ConvergenceWarning",
    "FixedPointSolver",
    "GMRESResult",
    "ImplicitPTC",
    "LoopResult",
    "NonFiniteError",
    "OnNonConvergence",
    "PTCOptions",
    "Registry",
    "Restart",
    "RungeKutta",
    "Solution",
    "SolverStats",
    "SteadyStateCondition",
    "SteadyStateSolver",
    "StepCallback",
    "StepInfo",
    "Stepper",
    "Stop",
    "StopReason",
    "Tableau",
    "check_options",
    "concat_states",
    "default_tolerance",
    "fixed_point",
    "flatten_states",
    "function_precision",
    "gmres",
    "initial_step",
    "option_names",
    "registries",
    "report_nonconvergence",
    "root",
    "run_loop",
    "sample_rms",
    "solve",
    "split_states",
    "steady_state",
    "unflatten_states",
    "validation",
]
