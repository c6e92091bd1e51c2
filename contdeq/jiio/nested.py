"""``nested_inference``: the naive reference for :func:`~contdeq.jiio.joint_inference`.

Projected gradient descent on the input, where every step solves the DEQ afresh and
differentiates through it (implicit backward, or backpropagation through the solver's steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..implicit import BackwardMode, ForwardSolver, backward_mode, equilibrium
from ..solvers.validation import (
    check_callable,
    check_func_output,
    check_positive_float,
    check_positive_int,
    check_state,
)
from .joint import Objective
from .projections import Projection

__all__ = ["NestedStats", "nested_inference"]


@dataclass
class NestedStats:
    """What :func:`nested_inference` did.

    Attributes:
        steps: gradient steps taken.
        f_calls: calls of ``f`` in all forward solves (the final one included).
        vjps: vector-Jacobian products of the backward passes (for ``"unrolled"``: one per
            forward call recorded on the graph) plus one per step for the objective.
        objective: ``(B,)`` the objective at the returned ``(z, x)``.
    """

    steps: int
    f_calls: int
    vjps: int
    objective: Tensor


class _Cell(nn.Module):
    """A plain callable ``f(z, x)`` as a module, for :func:`contdeq.equilibrium`."""

    def __init__(self, f: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.f = f

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.f(z, x)


def nested_inference(
    f: Callable[[Tensor, Tensor], Tensor],
    objective: Objective,
    x0: Tensor,
    z0: Tensor | None = None,
    *,
    steps: int,
    step_size: float,
    project: Projection | None = None,
    solver: ForwardSolver | None = None,
    backward: str | BackwardMode = "implicit",
    sign_gradient: bool = False,
    warm_start: bool = False,
    callback: Callable[[Tensor, Tensor], None] | None = None,
) -> tuple[Tensor, Tensor, NestedStats]:
    """Minimize ``objective(z*(x), x)`` by ``steps`` projected gradient steps on ``x``.

    Each step solves ``z* = f(z*, x)`` with ``solver``, differentiates the objective through
    the DEQ and updates ``x <- P(x - step_size * g)`` (``g`` or ``sign(g)``, as in PGD).

    Args:
        f: the cell, ``f(z, x) -> z`` (a module or any callable).
        objective: ``objective(z, x) -> (B,)``, minimized.
        x0: ``(B, ...)`` initial input.
        z0: ``(B, ...)`` initial state of every solve; default zeros shaped like ``x0``.
        steps: number of gradient steps.
        step_size: ``alpha``.
        project: ``project(x) -> x`` onto the feasible inputs (default none).
        solver: the forward solver (default ``ForwardSolver("anderson")``); with
            ``backward="unrolled"`` it must be ``"picard"`` or ``"ode"``.
        backward: ``"implicit"`` (default), ``"unrolled"``, or a backward mode object
            (e.g. ``Implicit(rtol=1e-8)``, a tighter tolerance).
        sign_gradient: step along ``sign(g)`` (PGD for an L∞ ball).
        warm_start: start each solve from the previous step's ``z*`` instead of ``z0``.
        callback: ``callback(z, x)`` after each step (``(B, ...)`` each, detached).

    Returns:
        ``(z, x, stats)``: the equilibrium at the final ``x`` and ``x``, detached, and
        :class:`NestedStats`.
    """
    check_callable(f, "f", "f(z, x) -> z")
    check_callable(objective, "objective", "objective(z, x) -> (B,)")
    x = check_state(x0, "x0").detach()
    z0 = torch.zeros_like(x) if z0 is None else check_state(z0, "z0").detach()
    check_positive_int(steps, "steps")
    check_positive_float(step_size, "step_size")
    project = project or (lambda v: v)
    cell = f if isinstance(f, nn.Module) else _Cell(f)
    solver = ForwardSolver("anderson") if solver is None else solver
    config = backward_mode(backward)
    f_calls = vjps = 0
    start = z0
    for _ in range(steps):
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            z, deq = equilibrium(cell, xr, start, solver=solver, backward=config)
            value = objective(z, xr)
            if not isinstance(value, Tensor) or value.shape != (x.shape[0],):
                raise ValueError(f"objective(z, x) must return one value per sample, shape "
                                 f"(B,) = ({x.shape[0]},)")
            (g,) = torch.autograd.grad(value.sum(), xr)
        f_calls += deq.forward.nfe
        vjps += 1 + (deq.backward.nfe if deq.backward is not None else deq.forward.nfe)
        x = check_func_output(project(x - step_size * (g.sign() if sign_gradient else g)), x,
                              "project(x)", state="x0").detach()
        start = z.detach() if warm_start else z0
        if callback is not None:
            callback(z.detach(), x)
    with torch.no_grad():
        z, deq = equilibrium(cell, x, start, solver=solver)
        value = objective(z, x)
    return z, x, NestedStats(steps, f_calls + deq.forward.nfe, vjps, value)
