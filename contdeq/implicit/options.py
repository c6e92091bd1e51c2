"""The forward solver of a layer (:class:`ForwardSolver`) and the validation of solver options."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from ..solvers import (
    CONTINUOUS,
    FIXED_POINT_METHODS,
    Registry,
    SolverStats,
    check_options,
    solve,
    steady_state,
)
from ..solvers.validation import check_on_nonconvergence

__all__ = ["FORWARD_SOLVERS", "UNROLLABLE_SOLVERS", "ForwardSolver", "check_solver_options"]

#: Forward solvers a layer accepts: every fixed-point method (:func:`~contdeq.solvers.fixed_point`)
#: and ``"ode"`` (steady state of ``dz/dt = f(z, x) - z``).
FORWARD_SOLVERS: Registry[Any] = Registry("forward solver", "solver",
                                          includes=(FIXED_POINT_METHODS,))
FORWARD_SOLVERS.register(CONTINUOUS, steady_state)


def unrollable(solver: str) -> bool:
    """Whether autograd can record ``solver``'s steps (``backward="unrolled"``): ``"ode"``, and
    the fixed-point methods whose class sets ``differentiable = True``."""
    return solver == CONTINUOUS or getattr(FIXED_POINT_METHODS[solver], "differentiable", False)


#: Forward solvers whose arithmetic is autograd-safe, so ``backward="unrolled"`` works.
#: (Anderson and Broyden update their history buffers in place.)
UNROLLABLE_SOLVERS = tuple(name for name in FORWARD_SOLVERS if unrollable(name))


class ForwardSolver:
    """A configured forward solver: ``solver(fx, z0) -> (z*, stats)`` with ``fx(z) = f(z, x)``
    (a :class:`~contdeq.solvers.BoundInput`, whose ``f`` the solve's one counted wrapper calls).

    Args:
        solver: ``"ode"`` integrates ``dz/dt = fx(z) - z`` to steady state with
            :func:`~contdeq.solvers.steady_state`; ``"anderson"``, ``"broyden"``, ``"picard"``
            (any name in ``FORWARD_SOLVERS``) iterate ``z = fx(z)`` with
            :func:`~contdeq.solvers.fixed_point`.
        on_nonconvergence: ``"ignore"``, ``"warn"`` or ``"raise"``.
        **options: keyword arguments of that solver function (``method``, ``atol``, ``rtol``,
            ``max_steps``, ...; for the discrete solvers also ``memory``, ``damping``, ...).
            Unknown names raise ``TypeError`` here, not at the first call. A ``callback``
            option is a layer step callback: it also sees the layer's input
            (:attr:`~contdeq.solvers.callback.StepInfo.x`) and may change it
            (``Restart(x=...)``, see :mod:`contdeq.solvers.callback`): the solve evaluates
            ``f`` at the new input from then on and reports the final one in
            ``stats.final_input``; ``fx`` is not changed.
    """

    def __init__(self, solver: str = "ode", *, on_nonconvergence: str = "warn", **options: Any):
        self.solver = FORWARD_SOLVERS.check(solver)
        self.on_nonconvergence = check_on_nonconvergence(on_nonconvergence)
        if "on_nonconvergence" in options:  # pragma: no cover - caught by the signature
            raise TypeError("pass on_nonconvergence once")
        check_solver_options(solver, options)
        self.options = dict(options)

    @property
    def differentiable(self) -> bool:
        """Whether backpropagation through the steps works (``backward="unrolled"``)."""
        return unrollable(self.solver)

    def __call__(self, fx: Callable[[Tensor], Tensor], z0: Tensor) -> tuple[Tensor, SolverStats]:
        """Solve from ``z0`` (``(B, ...)``); returns ``z*`` shaped like ``z0`` and the stats."""
        if z0.ndim == 1:  # one scalar per sample; the solvers take a 1-D state as one unbatched
            z, stats = self(lambda z: fx(z.squeeze(1)).unsqueeze(1), z0.unsqueeze(1))
            return z.squeeze(1), stats
        return solve(self.solver, fx, z0, on_nonconvergence=self.on_nonconvergence,
                     **self.options)

    def with_options(self, **options: Any) -> ForwardSolver:
        """A copy with ``options`` overriding this solver's options."""
        return ForwardSolver(
            self.solver, on_nonconvergence=self.on_nonconvergence, **{**self.options, **options}
        )

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"ForwardSolver({self.solver!r}{opts})"


def check_solver_options(solver: str, options: Mapping[str, Any]) -> None:
    """Reject unknown option names of ``solver`` (``"ode"``, a fixed-point method, or the
    backward's ``"gmres"``) with a ``TypeError`` (torchdeq silently ignores them, its issue #12);
    the names come from the solvers' signatures (:func:`contdeq.solvers.option_names`)."""
    if solver == "gmres":  # the backward's GMRES: only its restart length
        if set(options) - {"restart"}:
            raise TypeError(f"unknown option(s) {sorted(set(options) - {'restart'})} for "
                            "backward_method='gmres'; it accepts ['restart']")
        return
    check_options(solver, options)
