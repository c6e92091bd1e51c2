"""``fixed_point``: solve ``z = g(z)`` per sample with Picard, Anderson or Broyden iteration."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .anderson import Anderson
from .broyden import Broyden
from .counting import CountedMap
from .errors import OnNonConvergence, report_nonconvergence
from .newton import Newton
from .picard import Picard
from .progress import Progress
from .stats import SolverStats
from .structure import solve_flattened
from .termination import SteadyStateCondition, sample_rms
from .validation import (
    check_callable,
    check_choice,
    check_on_nonconvergence,
    check_positive_float,
    check_positive_int,
    check_state,
    check_tolerances,
)

#: The discrete solvers, by name.
FIXED_POINT_METHODS = {
    "anderson": Anderson, "broyden": Broyden, "picard": Picard, "newton": Newton,
}


def fixed_point(
    g: Callable[[Tensor], Tensor],
    z0: Tensor | tuple[Tensor, ...],
    *,
    method: str = "anderson",
    atol: float = 1e-4,
    rtol: float = 1e-4,
    max_steps: int = 100,
    on_nonconvergence: OnNonConvergence = "warn",
    record_trajectory: bool = False,
    timeout: float | None = None,
    freeze_converged: bool = True,
    **options: float | int,
) -> tuple[Tensor, SolverStats]:
    """Find ``z = g(z)`` for every sample of a batch.

    Sample ``b`` (first dimension) has converged when
    ``rms(g(z_b) - z_b) <= atol + rtol * rms(z_b)``; converged samples stay where they are
    while the others iterate. The returned ``z`` of each sample is its iterate with the
    smallest residual, and ``stats.residual`` is that residual. With
    ``freeze_converged=False`` every sample iterates until all have converged and the last
    iterate is returned: about half the tensor operations per iteration (what a small state
    costs), for maps where iterating further cannot hurt a converged sample, such as the
    contractive linear solve of the implicit backward.

    Args:
        g: the map, ``g(z) -> z``, shape, dtype and device preserved.
        z0: ``(B, ...)`` initial guess, batch dimension first. Or a tuple of per-scale
            states ``(B, *shape_s)``: then ``g(zs)`` takes and returns such tuples, the solve
            runs on them flattened (one residual norm per sample over all scales;
            :func:`~contdeq.solvers.flatten_states`) and ``z`` is a tuple.
        method: ``"anderson"`` (default), ``"broyden"``, ``"picard"`` or ``"newton"``
            (Newton-Krylov with a line search: GMRES on ``(I - dg/dz) delta = g(z) - z``
            with Jacobian-vector products, counted in ``stats.jvps``; for maps that are not
            contractive, or converge slowly).
        atol, rtol: tolerances (RMS norms). ``atol=0`` gives a scale-invariant test.
        max_steps: iteration limit.
        on_nonconvergence: ``"ignore"``, ``"warn"`` (default) or ``"raise"``.
        record_trajectory: keep per-iteration residuals in the stats.
        timeout: wall-clock limit in seconds.
        freeze_converged: freeze each sample once it converges and return its best iterate
            (default); ``False``: iterate all samples together (see above).
        **options: method options: anderson ``memory=5, damping=1.0, regularization=1e-4``;
            broyden ``memory=30``; picard ``damping=1.0``; newton ``jvp="reverse", restart=60,
            max_linear_iterations=200, line_search_steps=10``. Unknown options raise ``TypeError``.

    Returns:
        ``(z, stats)``: ``z`` shaped like ``z0`` and a :class:`SolverStats` (``nfe`` counts
        every call of ``g``; ``accepted``/``rejected``/``t_final`` are ``None``).
    """
    if isinstance(z0, tuple):  # per-scale states: solve on them flattened
        return solve_flattened(fixed_point, locals())
    check_callable(g, "g", "g(z) -> z")
    z0 = check_state(z0)
    check_choice(method, "method", tuple(FIXED_POINT_METHODS))
    check_tolerances(atol, rtol)
    check_positive_int(max_steps, "max_steps")
    check_on_nonconvergence(on_nonconvergence)
    if timeout is not None:
        check_positive_float(timeout, "timeout")
    if not isinstance(freeze_converged, bool):
        raise TypeError(f"freeze_converged must be a bool, got {type(freeze_converged).__name__}")

    counted = CountedMap(g, z0, name="g")
    z = z0.reshape(counted.flat_shape)
    try:
        cls = FIXED_POINT_METHODS[method]
        # A solver with ``needs_map`` evaluates g itself (through the counted map), and the loop
        # takes g from the solver (which may hand back a value it already has).
        solver = cls(z, g=counted, **options) if getattr(cls, "needs_map", False) else cls(
            z, **options)
    except TypeError as exc:
        raise TypeError(f"fixed_point(method={method!r}): {exc}") from None
    gz = counted(z)
    residual = gz - z
    progress = Progress(
        SteadyStateCondition(float(atol), float(rtol)), z, residual,
        max_steps=max_steps, timeout=timeout, record=record_trajectory, name="g",
    )
    iterate = _iterate_freezing if freeze_converged else _iterate_together
    loop_map = solver.map if getattr(cls, "needs_map", False) else counted
    z, reason = iterate(solver, loop_map, progress, z, gz, residual)
    stats = progress.finish(method, counted.calls, reason)
    stats.jvps = getattr(solver, "jvps", None)
    stats.linear_iterations = getattr(solver, "linear_iterations", None)
    report_nonconvergence(stats, on_nonconvergence)
    return z.reshape(z0.shape), stats


def _iterate_freezing(
    solver: Anderson | Broyden | Picard, g: CountedMap, progress: Progress, z: Tensor,
    gz: Tensor, residual: Tensor,
) -> tuple[Tensor, str]:
    """Iterate the samples that have not converged (the others stay put) until none is left or
    a limit is hit; returns each sample's best iterate and the stop reason."""
    best = z
    while (reason := progress.stop_reason()) is None:
        active = progress.active
        proposal = solver.propose(z, gz, residual)
        z = torch.where(active.unsqueeze(1), proposal, z)
        gz = g(z)
        residual = gz - z
        progress.steps += 1
        res = sample_rms(residual)
        tol = progress.checked_tolerance(z, res, active)
        improved = (res < progress.res).logical_and_(active)
        best = torch.where(improved.unsqueeze(1), z, best)
        progress.accept(improved, res, tol)
    return best, reason


def _iterate_together(
    solver: Anderson | Broyden | Picard, g: CountedMap, progress: Progress, z: Tensor,
    gz: Tensor, residual: Tensor,
) -> tuple[Tensor, str]:
    """Iterate every sample (none frozen) until all have converged or a limit is hit; returns
    the last iterate and the stop reason."""
    while (reason := progress.stop_reason()) is None:
        z = solver.propose(z, gz, residual)
        gz = g(z)
        residual = gz - z
        progress.steps += 1
        progress.update_all(z, sample_rms(residual))
    return z, reason
