"""Per-sample bookkeeping shared by every solver loop: residuals, freezing, limits, stats.

Everything here works on ``(B,)`` vectors, so its cost is the number of tensor operations
dispatched per iteration, not their size: the loops call :meth:`Progress.update` once per
accepted step and keep that count small. Host reads of 0-dim results use ``tolist()``, which
reads the value without dispatching an operation (``float()``/``bool()`` dispatch
``_local_scalar_dense``); the loops elsewhere in this package do the same.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from .stats import SolverStats, StopReason
from .termination import SteadyStateCondition, sample_rms
from .validation import all_finite, finite_where, raise_nonfinite


class Progress:
    """Tracks which samples have converged, their residuals and the solve's limits.

    Args:
        condition: the per-sample convergence test.
        z: ``(B, D)`` initial state.
        residual: ``(B, D)`` residual at ``z``.
        max_steps: iteration limit.
        timeout: wall-clock limit in seconds (``None``: none).
        record: keep a ``(K, B)`` history of residuals (and times, for ODE solves).
        name: the user's function's name in error messages.
        track_time: keep the pseudo-time each sample has reached (ODE solves).
    """

    def __init__(
        self,
        condition: SteadyStateCondition,
        z: Tensor,
        residual: Tensor,
        *,
        max_steps: int,
        timeout: float | None,
        record: bool,
        name: str,
        track_time: bool = False,
    ) -> None:
        self.start = time.perf_counter()
        self.condition = condition
        self.max_steps = max_steps
        self.timeout = timeout
        self.name = name
        self.steps = 0
        self.res = sample_rms(residual)
        self.tol = condition.tolerance(z)
        if not all_finite(self.res + self.tol):
            raise_nonfinite(name, 0)
        self.active = self.res > self.tol
        #: Each sample's best iterate so far, when a loop keeps one (see :meth:`keep_best`).
        self.best: BestIterate | None = None
        # The last iterate, while :meth:`update_all` waits for a residual to rise before it
        # keeps a best iterate (see :meth:`keep_best_after_rise`).
        self._last_z: Tensor | None = None
        # Whether any sample is active, when the last update already knew it (saves a sync).
        self._any_active: bool | None = None
        #: Set when a step callback asked to stop (:class:`~contdeq.solvers.callback.Stop`).
        self.halted = False
        # Pseudo-time is accumulated in float64 (float32 on MPS): in the state's dtype a
        # float32/bfloat16 sum stalls or stops just short of ``t_max`` and the solve never ends.
        self.t = torch.zeros_like(self.res, dtype=_time_dtype(z)) if track_time else None
        self.res_history: list[Tensor] | None = [self.res.clone()] if record else None
        self.t_history: list[Tensor] | None = (
            [self.t.clone()] if record and self.t is not None else None
        )

    @property
    def n_active(self) -> int:
        """Samples that have not converged yet."""
        return self.active.sum().tolist()

    def stop_reason(self, t_max: float = math.inf, *, any_active: bool | None = None,
                    t_min: float | None = None) -> str | None:
        """Why the loop must stop now, or ``None`` to go on. A loop that already read whether
        any sample is active, or the active samples' least pseudo-time, passes them (no
        further synchronization)."""
        if any_active is None:
            any_active = self._any_active
        if any_active is None:
            any_active = self.active.any().tolist()
        if not any_active:
            return "converged"
        if self.halted:
            return "callback"
        if self.steps >= self.max_steps:
            return "max_steps"
        if t_max < math.inf and self.t is not None:
            if t_min is None:
                t_min = float(self.t[self.active].min())
            if t_min >= t_max:
                return "t_max"
        if self.timeout is not None and time.perf_counter() - self.start >= self.timeout:
            return "timeout"
        return None

    def update(
        self,
        z: Tensor,
        residual_norm: Tensor,
        moved: Tensor,
        dt: Tensor | float | None = None,
    ) -> None:
        """Record the residual norms (``(B,)``) of the samples in ``moved`` (``(B,)`` bool, a
        subset of the active ones) and freeze those that now meet their tolerance.

        Raises :class:`NonFiniteError` when a moved sample's residual or tolerance is NaN/Inf
        (a non-finite or overflowing state makes one of them non-finite).
        """
        self.accept(moved, residual_norm, self.checked_tolerance(z, residual_norm, moved), dt, z)

    def checked_tolerance(self, z: Tensor, residual_norm: Tensor, where: Tensor) -> Tensor:
        """``(B,)`` tolerance at state ``z``.

        Raises :class:`NonFiniteError` when, for a sample in ``where`` (``(B,)`` bool), the
        residual norm or the tolerance is NaN/Inf: an overflowing state gives an infinite
        tolerance, which must not count as converged.
        """
        tol = self.condition.tolerance(z)
        if not finite_where(residual_norm + tol, where):
            raise_nonfinite(self.name, self.steps)
        return tol

    def trial_tolerance(self, z: Tensor, residual_norm: Tensor, where: Tensor) -> Tensor | None:
        """``(B,)`` tolerance at a trial state ``z``, or ``None`` when, for a sample in ``where``
        (``(B,)`` bool), the residual norm or the tolerance is NaN/Inf: a trial step to reject
        and shrink, not an error."""
        tol = self.condition.tolerance(z)
        return tol if finite_where(residual_norm + tol, where) else None

    def keep_best(self, z: Tensor) -> None:
        """Start keeping each sample's best iterate (smallest residual), from the current state
        ``z`` (``(B, D)``): :meth:`accept` given its ``z`` then offers every accepted state."""
        self.best = BestIterate(z, self.res, self.tol)

    def keep_best_after_rise(self, z: Tensor) -> None:
        """Keep each sample's best iterate, from the current state ``z`` (``(B, D)``), for a loop
        that calls :meth:`update_all`, but only from the first step where a residual rises.

        Until then every sample's residual has not increased, so the last iterate is each
        sample's best and nothing needs copying; the rise is detected in the reduction that
        :meth:`update_all` makes anyway.
        """
        self._last_z = z

    def reopen_stale(self, z: Tensor, residual_norm: Tensor, tol: Tensor | None = None) -> bool:
        """Re-test every sample on ``residual_norm`` (``(B,)``), evaluated at the final state
        ``z`` with all samples together, after every sample was frozen as converged; ``tol``:
        the ``(B,)`` tolerances at ``z`` where the loop has them (frozen samples' at least).

        A frozen sample's residual was measured when it froze; if ``f`` couples samples (e.g. a
        batch statistic), others moving since may have changed it. Samples that now fail are
        active again (returns ``True``: the loop goes on), so no stale claim of convergence is
        returned. Costs no evaluation: the loops pass the residual their last call computed.
        """
        if tol is None:
            tol = self.condition.tolerance(z)
        # Failing and frozen: on booleans ``a > b`` is ``a and not b`` (one operation).
        stale = (residual_norm > tol) > self.active
        if not stale.any().tolist():
            return False
        self.res = torch.where(stale, residual_norm, self.res)
        self.tol = torch.where(stale, tol, self.tol)
        self.active = self.active | stale
        self._any_active = True
        if self.best is not None:
            best = self.best
            self.best = BestIterate(torch.where(stale.unsqueeze(1), z, best.z),
                                    torch.where(stale, residual_norm, best.res),
                                    torch.where(stale, tol, best.tol))
        return True

    def restart(self, z: Tensor, residual_norm: Tensor) -> None:
        """The function or the state changed (a step callback's
        :class:`~contdeq.solvers.callback.Restart`): judge every sample afresh on
        ``residual_norm`` (``(B,)``, all samples evaluated at ``z``, ``(B, D)``); the best
        iterate, kept for the old function, restarts at ``z``.

        Raises :class:`NonFiniteError` when a residual or tolerance is NaN/Inf.
        """
        tol = self.checked_tolerance(z, residual_norm, torch.ones_like(self.active))
        self.res, self.tol = residual_norm, tol
        self.active = residual_norm > tol
        self._any_active = None
        if self.best is not None:
            self.best = BestIterate(z, self.res, self.tol)

    def final_state(self, z: Tensor) -> Tensor:
        """The state to return: each unconverged sample's best iterate (when kept, and better
        than ``z``), the others' from ``z`` (``(B, D)``); residuals and tolerances follow."""
        best = self.best
        if best is None:
            return z
        take = (best.res < self.res).logical_and_(self.res > self.tol)
        self.res = torch.where(take, best.res, self.res)
        self.tol = torch.where(take, best.tol, self.tol)
        return torch.where(take.unsqueeze(1), best.z, z)

    def accept(
        self, moved: Tensor, residual_norm: Tensor, tol: Tensor, dt: Tensor | float | None = None,
        z: Tensor | None = None, *, any_active: bool | None = None, active: Tensor | None = None,
    ) -> None:
        """Record the residual norms and tolerances (``(B,)``, checked finite by the caller, e.g.
        with :meth:`checked_tolerance`) of the samples in ``moved``, advance their pseudo-time by
        ``dt`` and freeze those that now meet their tolerance: :meth:`update` for a loop that
        computed the tolerances itself. With ``z`` (the ``(B, D)`` state) the best iterate kept
        since :meth:`keep_best` is updated. ``any_active``: whether any sample is still active
        afterwards, when the loop's one host read of the step already told (saves a sync);
        ``active``: :meth:`active_after` of these arguments, when the loop computed it for that
        read."""
        if self.best is not None and z is not None:
            self.best.offer(z, residual_norm, tol, moved)
        self.res = torch.where(moved, residual_norm, self.res)
        self.tol = torch.where(moved, tol, self.tol)
        if self.t is not None and isinstance(dt, Tensor):
            self.t.addcmul_(dt, moved)
        elif self.t is not None and dt is not None:
            self.t = torch.where(moved, self.t + dt, self.t)
        # Equal to clearing the moved samples that meet their tolerance: the others keep their
        # residual and tolerance.
        self.active = self.res > self.tol if active is None else active
        self._any_active = any_active
        if self.res_history is not None:
            self.res_history.append(self.res.clone())
            if self.t_history is not None and self.t is not None:
                self.t_history.append(self.t.clone())

    def active_after(self, moved: Tensor, residual_norm: Tensor, tol: Tensor) -> Tensor:
        """The ``(B,)`` samples :meth:`accept` leaves active, computed before it (for a loop that
        reads whether any is left in the step's one host read): a moved sample stays active
        above its tolerance, the others as they are (an active sample's residual is above its
        tolerance, a frozen one's within it)."""
        return torch.where(moved, residual_norm > tol, self.active)

    def load(self, res: Tensor, tol: Tensor, active: Tensor, t: Tensor | None) -> None:
        """Take the ``(B,)`` residual norms, tolerances, active mask and pseudo-time a loop kept
        itself (the compiled step) as references, recording the history when kept."""
        self.res, self.tol, self.active, self.t = res, tol, active, t
        self._any_active = None
        if self.res_history is not None:
            self.res_history.append(self.res.clone())
            if self.t_history is not None and self.t is not None:
                self.t_history.append(self.t.clone())

    def update_all(self, z: Tensor, residual_norm: Tensor) -> None:
        """Record the residual norms (``(B,)``) of every sample (all moved together, none frozen)
        and mark which have converged; a handful of tensor operations (and the best iterate's
        update, when kept).

        Raises :class:`NonFiniteError` when a residual or tolerance is NaN/Inf.
        """
        tol = self.condition.tolerance(z)
        gap = residual_norm - tol
        rise = 0.0
        if self._last_z is None:
            lowest, highest = torch.stack(torch.aminmax(gap)).tolist()  # NaN/Inf show here
        else:  # one reduction also tells whether a residual rose
            highest, neg_lowest, rise = torch.stack(
                (gap, gap.neg(), residual_norm - self.res)).amax(dim=1).tolist()
            lowest = -neg_lowest
        if not (math.isfinite(lowest) and math.isfinite(highest)):
            raise_nonfinite(self.name, self.steps)
        if self._last_z is not None:
            if rise > 0:  # the previous iterate is every sample's best so far
                self.best = BestIterate(self._last_z, self.res, self.tol)
                self._last_z = None
            else:
                self._last_z = z
        if self.best is not None:
            self.best.offer(z, residual_norm, tol)
        self.res, self.tol = residual_norm, tol
        self.active = gap > 0
        self._any_active = highest > 0
        if self.res_history is not None:
            self.res_history.append(self.res.clone())

    def finish(
        self,
        method: str,
        nfe: int,
        stop_reason: StopReason | str,
        accepted: int | None = None,
        rejected: int | None = None,
    ) -> SolverStats:
        """The :class:`SolverStats` of the finished solve. ``stop_reason`` becomes
        ``"converged"`` when every returned sample converged (a best iterate can converge
        although the loop stopped at a limit)."""
        converged = self.res <= self.tol
        if stop_reason != "converged" and converged.all().tolist():
            stop_reason = "converged"
        return SolverStats(
            method=method,
            nfe=nfe,
            steps=self.steps,
            residual=self.res,
            tolerance=self.tol,
            converged=converged,
            wall_time=time.perf_counter() - self.start,
            stop_reason=stop_reason,
            accepted=accepted,
            rejected=rejected,
            t_final=None if self.t is None else self.t.to(self.res.dtype),
            residual_history=None if self.res_history is None else torch.stack(self.res_history),
            time_history=(
                None if self.t_history is None else torch.stack(self.t_history).to(self.res.dtype)
            ),
        )


class BestIterate:
    """Each sample's iterate with the smallest residual so far, with its residual and tolerance.

    Args:
        z: ``(B, D)`` state.
        res: ``(B,)`` residual norms at ``z``.
        tol: ``(B,)`` tolerances at ``z``.
    """

    def __init__(self, z: Tensor, res: Tensor, tol: Tensor) -> None:
        self.z, self.res, self.tol = z, res, tol

    def offer(self, z: Tensor, res: Tensor, tol: Tensor, where: Tensor | None = None) -> None:
        """Keep ``z``'s samples (those in ``where``, ``(B,)`` bool, if given) whose residual
        ``res`` is smaller."""
        improved = res < self.res
        if where is not None:
            improved.logical_and_(where)
        self.z = torch.where(improved.unsqueeze(1), z, self.z)
        self.res = torch.where(improved, res, self.res)
        self.tol = torch.where(improved, tol, self.tol)


def _time_dtype(z: Tensor) -> torch.dtype:
    """Accumulation dtype of the pseudo-time: float64 where the device supports it."""
    return torch.float32 if z.device.type == "mps" else torch.float64
