"""``fixed_point``: solve ``z = g(z)`` per sample with Picard, Anderson or Broyden iteration."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import anderson, broyden, newton, picard  # noqa: F401  (each registers its method)
from .callback import StepCallback, StepHook
from .counting import CountedMap
from .errors import OnNonConvergence, report_nonconvergence
from .loop import Stepper, run_loop
from .progress import Progress
from .protocol import FixedPointSolver
from .registry import FIXED_POINT_METHODS
from .stats import LoopResult, Solution, StopReason
from .structure import solve_flattened
from .termination import SteadyStateCondition, sample_rms
from .unbatched import solve_as_one_sample
from .validation import (
    check_bool,
    check_callable,
    check_callback,
    check_on_nonconvergence,
    check_positive_float,
    check_positive_int,
    check_state,
    finite_where,
    raise_nonfinite,
    resolve_tolerances,
)

__all__ = ["FIXED_POINT_METHODS", "fixed_point"]


def fixed_point(
    g: Callable[[Tensor], Tensor],
    z0: Tensor | tuple[Tensor, ...],
    *,
    method: str = "anderson",
    atol: float | None = None,
    rtol: float | None = None,
    max_steps: int = 100,
    on_nonconvergence: OnNonConvergence = "warn",
    record_trajectory: bool = False,
    timeout: float | None = None,
    freeze_converged: bool = True,
    per_sample: bool = True,
    callback: StepCallback | None = None,
    **options: float | int,
) -> Solution:
    """Find ``z = g(z)`` for every sample of a batch.

    Sample ``b`` (first dimension) has converged when
    ``rms(g(z_b) - z_b) <= atol + rtol * rms(z_b)``; converged samples stay where they are
    while the others iterate; when the loop stops, the frozen ones are re-tested on the last
    call's residual (no extra call): when all had converged, those that no longer pass iterate
    again; at a limit they are returned unconverged. The
    returned ``z`` of each sample is its iterate with the smallest residual, and
    ``stats.residual`` is that residual. With ``freeze_converged=False`` every sample iterates
    until all have converged at once: about half the tensor operations per iteration (what a
    small state costs), for maps where iterating further cannot hurt a converged sample, such
    as the contractive linear solve of the implicit backward; a sample that stops unconverged
    still returns its best iterate.

    A 1-D ``z0`` is one unbatched state: tested as a whole, returned 1-D. ``per_sample=False``
    does the same for a whole batch, for a ``g`` that couples its samples (a batch mean or
    normalization): per-sample freezing assumes each sample's residual depends on that sample
    only.

    Anderson and Broyden update their history in place and cannot be differentiated through:
    with grad enabled and ``g(z0)`` requiring grad they raise; run them under
    ``torch.no_grad()`` and differentiate implicitly (the DEQ layers,
    :func:`contdeq.implicit.equilibrium`), or unroll ``"picard"``.

    Args:
        g: the map, ``g(z) -> z``, shape, dtype and device preserved.
        z0: ``(B, ...)`` initial guess, batch dimension first; a 1-D ``(D,)`` state is one
            unbatched sample (statistics of shape ``(1,)``). Or a tuple of per-scale
            states ``(B, *shape_s)``: then ``g(zs)`` takes and returns such tuples, the solve
            runs on them flattened (one residual norm per sample over all scales;
            :func:`~contdeq.solvers.flatten_states`) and ``z`` is a tuple.
        method: ``"anderson"`` (default), ``"broyden"``, ``"picard"`` or ``"newton"``
            (Newton-Krylov with a line search: GMRES on ``(I - dg/dz) delta = g(z) - z``
            with Jacobian-vector products, counted in ``stats.jvps``; for maps that are not
            contractive, or converge slowly).
        atol, rtol: tolerances (RMS norms). ``atol=0`` gives a scale-invariant test. Default
            (``None``): :func:`~contdeq.solvers.validation.default_tolerance` of ``z0``'s dtype
            (``1e-4``; ``2 * eps`` for half precision and under ``torch.autocast``).
        max_steps: iteration limit.
        on_nonconvergence: ``"ignore"``, ``"warn"`` (default) or ``"raise"``.
        record_trajectory: keep per-iteration residuals in the stats.
        timeout: wall-clock limit in seconds.
        freeze_converged: freeze each sample once it converges and return its best iterate
            (default); ``False``: iterate all samples together (see above).
        per_sample: ``True`` (default): each sample is tested (and frozen) on its own;
            ``False``: the batch is one state, for a ``g`` that couples samples. Statistics
            then have shape ``(1,)``.
        callback: ``callback(info) -> None | Stop() | Restart(z=...)``, called after every
            iteration with a :class:`~contdeq.solvers.callback.StepInfo`: observe, stop
            (``stats.stop_reason == "callback"``) or replace the state / announce a changed
            ``g`` (the method's history restarts through its ``reset()``; see
            :mod:`contdeq.solvers.callback`).
        **options: method options: anderson ``memory=5, damping=1.0, regularization=1e-4``;
            broyden ``memory=30``; picard ``damping=1.0``; newton ``jvp="reverse", restart=60,
            max_linear_iterations=200, line_search_steps=10``. Unknown options raise ``TypeError``.

    Returns:
        A :class:`~contdeq.solvers.Solution` ``(z, stats)`` (it unpacks as ``z, stats = ...``):
        ``z`` shaped like ``z0`` and a :class:`SolverStats` (``nfe`` counts
        every call of ``g``; ``accepted``/``rejected``/``t_final`` are ``None``).
    """
    if isinstance(z0, tuple):  # per-scale states: solve on them flattened
        return Solution(*solve_flattened(fixed_point, locals()))
    check_bool(per_sample, "per_sample")
    if isinstance(z0, Tensor) and z0.ndim >= 1 and (z0.ndim == 1 or not per_sample):
        return Solution(*solve_as_one_sample(fixed_point, locals()))
    check_callable(g, "g", "g(z) -> z")
    z0 = check_state(z0)
    FIXED_POINT_METHODS.check(method)
    atol, rtol = resolve_tolerances(atol, rtol, z0)
    check_positive_int(max_steps, "max_steps")
    check_on_nonconvergence(on_nonconvergence)
    if timeout is not None:
        check_positive_float(timeout, "timeout")
    check_bool(freeze_converged, "freeze_converged")
    check_callback(callback)

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
    if not getattr(cls, "differentiable", False) and torch.is_grad_enabled() and gz.requires_grad:
        raise RuntimeError(
            f"fixed_point(method={method!r}) cannot be differentiated through its iterations "
            "(it updates its history in place), and g(z0) requires grad: run it under "
            "torch.no_grad() and get gradients implicitly (the DEQ layers or "
            "contdeq.implicit.equilibrium with backward='implicit'), or backpropagate through "
            "the steps of method='picard' (backward='unrolled' with solver='picard' or 'ode')"
        )
    residual = gz - z
    progress = Progress(
        SteadyStateCondition(float(atol), float(rtol)), z, residual,
        max_steps=max_steps, timeout=timeout, record=record_trajectory, name="g",
    )
    loop_map = getattr(solver, "map", counted) if getattr(cls, "needs_map", False) else counted
    hook = None if callback is None else StepHook(callback, method, counted.shape, counted)
    stepper = (FreezingIteration(solver, loop_map, z, gz, residual) if freeze_converged
               else TogetherIteration(solver, loop_map, z, gz, residual, progress))
    result = run_loop(stepper, z, progress, hook)
    stats = progress.finish(method, counted.calls, result.stop_reason)
    stats.jvps = getattr(solver, "jvps", None)
    stats.linear_iterations = getattr(solver, "linear_iterations", None)
    stats.final_input = counted.final_input
    report_nonconvergence(stats, on_nonconvergence)
    return Solution(result.z.reshape(z0.shape), stats)


class _Iteration(Stepper):
    """What both fixed-point steppers share: the method, the counted map, ``g(z)`` and the
    residual at the current state, and the restart after a step callback."""

    def __init__(self, solver: FixedPointSolver, g: CountedMap, gz: Tensor, residual: Tensor
                 ) -> None:
        self.solver, self.g, self.gz, self.residual = solver, g, gz, residual

    def propose(self, z: Tensor) -> Tensor:
        return self.solver.propose(z, self.gz, self.residual)

    def evaluate(self, z: Tensor) -> Tensor:
        """``g(z)`` and the residual kept; returns the residual norms ``(B,)``."""
        self.gz = self.g(z)
        self.residual = self.gz - z
        return sample_rms(self.residual)

    def restart(self, z: Tensor, progress: Progress) -> None:
        """A step callback changed ``g`` or the state ``z``: ``g(z)`` afresh, every sample
        re-tested, the solver's history cleared."""
        reset = getattr(self.solver, "reset", None)
        if reset is None:
            raise TypeError(f"a step callback asked for a restart, but the fixed-point solver "
                            f"{type(self.solver).__name__} has no reset() method (see "
                            "FixedPointSolver)")
        reset()
        progress.restart(z, self.evaluate(z))


class FreezingIteration(_Iteration):
    """Iterate the samples that have not converged (the others stay put) until none is left
    or a limit is hit; the result is each sample's best iterate.

    After a step where every active sample's residual shrank, every sample's best iterate is
    its current one (a frozen sample froze at its best and has not moved): the best iterate is
    copied only after a step where some active residual did not shrink."""

    def __init__(self, solver: FixedPointSolver, g: CountedMap, z: Tensor, gz: Tensor,
                 residual: Tensor) -> None:
        super().__init__(solver, g, gz, residual)
        self.best = z
        self.res: Tensor | None = None  # residual norms of the last call (every sample)
        # What a frozen and a not shrinking sample contribute to the step's probe (made once:
        # a Python scalar in ``torch.where`` is one more tensor operation per step).
        self.frozen = torch.full((), -math.inf, dtype=z.dtype, device=z.device)
        self.nan = torch.full((), math.nan, dtype=z.dtype, device=z.device)

    def step(self, z: Tensor, progress: Progress) -> tuple[Tensor, bool]:
        active = progress.active
        z = torch.where(active.unsqueeze(1), self.propose(z), z)
        res = self.res = self.evaluate(z)
        tol = progress.condition.tolerance(z)
        shrank = res < progress.res
        # The step's one sync: every active sample finite with a shrinking residual (the usual
        # case; an active sample not shrinking, or NaN, makes the probe NaN), and whether any
        # stays active (frozen samples count as -inf).
        gap = torch.where(shrank, res - tol, self.nan)
        probe = torch.where(active, gap, self.frozen).amax().tolist()
        still = None
        if math.isfinite(probe):
            improved, self.best, any_active = active, z, probe > 0
        else:
            improved = shrank.logical_and_(active)
            still = progress.active_after(improved, res, tol)
            # The step's second read: whether the active samples are finite (the fast sum of
            # all_finite, exact below when it is not finite) and whether any stays active.
            sums = res + tol
            total, any_active = torch.stack((sums.sum(), still.any())).tolist()
            if not math.isfinite(total) and not finite_where(sums, active):
                raise_nonfinite(progress.name, progress.steps)
            self.best = torch.where(improved.unsqueeze(1), z, self.best)
        progress.accept(improved, res, tol, any_active=any_active, active=still)
        return z, True

    def restart(self, z: Tensor, progress: Progress) -> None:
        super().restart(z, progress)
        self.best, self.res = z, progress.res

    def retest(self, z: Tensor, progress: Progress) -> bool:
        # Every frozen sample froze at its best iterate (``z == best`` there) and the last call
        # saw it there.
        return self.res is not None and progress.reopen_stale(z, self.res)

    def resume(self, z: Tensor, progress: Progress) -> None:
        self.best = z

    def result(self, z: Tensor, reason: StopReason | str, progress: Progress) -> LoopResult:
        return LoopResult(self.best, reason)


class TogetherIteration(_Iteration):
    """Iterate every sample (none frozen) until all have converged or a limit is hit; the
    result is each sample's best iterate (the last one when all converged)."""

    def __init__(self, solver: FixedPointSolver, g: CountedMap, z: Tensor, gz: Tensor,
                 residual: Tensor, progress: Progress) -> None:
        super().__init__(solver, g, gz, residual)
        progress.keep_best_after_rise(z)

    def step(self, z: Tensor, progress: Progress) -> tuple[Tensor, bool]:
        z = self.propose(z)
        progress.update_all(z, self.evaluate(z))
        return z, True

