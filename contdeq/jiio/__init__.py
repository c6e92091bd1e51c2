"""Joint inference and input optimization (JIIO) for equilibrium models.

:func:`joint_inference` solves ``min_x L(z*(x), x)`` for a DEQ ``z* = f(z*, x)`` as one
augmented equilibrium over the state, its adjoint and the input (Gurumurthy et al., NeurIPS
2021), by Anderson iteration or as the steady state of an ODE; :func:`optimal_objective`
trains through it; :func:`nested_inference` is the naive loop it replaces; the projections
constrain the input. See ``docs/jiio.md``.
"""

from .joint import JIIO_SOLVERS, JIIOStats, StepSizes, joint_inference, optimal_objective
from .nested import NestedStats, nested_inference
from .projections import Projection, box, compose, l2_ball, linf_ball

__all__ = [
    "JIIO_SOLVERS",
    "JIIOStats",
    "NestedStats",
    "Projection",
    "StepSizes",
    "box",
    "compose",
    "joint_inference",
    "l2_ball",
    "linf_ball",
    "nested_inference",
    "optimal_objective",
]
