"""Per-sample bookkeeping shared by every solver loop: residuals, freezing, limits, stats."""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from .stats import SolverStats
from .termination import SteadyStateCondition, sample_rms
from .validation import raise_nonfinite


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
        self.res, self.tol, converged = condition.evaluate(z, residual)
        self._check_finite(torch.ones_like(converged))
        self.active = ~converged
        self.t = torch.zeros_like(self.res) if track_time else None
        self.res_history: list[Tensor] | None = [self.res.clone()] if record else None
        self.t_history: list[Tensor] | None = (
            [self.t.clone()] if record and track_time else None
        )

    @property
    def n_active(self) -> int:
        """Samples that have not converged yet."""
        return int(self.active.sum())

    def stop_reason(self, t_max: float = math.inf) -> str | None:
        """Why the loop must stop now, or ``None`` to go on."""
        if not bool(self.active.any()):
            return "converged"
        if self.steps >= self.max_steps:
            return "max_steps"
        if t_max < math.inf and self.t is not None and float(self.t[self.active].min()) >= t_max:
            return "t_max"
        if self.timeout is not None and time.perf_counter() - self.start >= self.timeout:
            return "timeout"
        return None

    def update(
        self,
        z: Tensor,
        residual: Tensor,
        moved: Tensor,
        dt: Tensor | float | None = None,
        residual_norm: Tensor | None = None,
    ) -> None:
        """Record the new residuals of the samples in ``moved`` (``(B,)`` bool) and freeze the
        ones that now meet their tolerance. Raises on NaN/Inf in a moved sample.

        ``residual_norm`` (``(B,)``) may be passed when the caller already computed it.
        """
        res = sample_rms(residual) if residual_norm is None else residual_norm
        tol = self.condition.tolerance(z)
        self.res = torch.where(moved, res, self.res)
        self.tol = torch.where(moved, tol, self.tol)
        self._check_finite(moved)
        if self.t is not None and dt is not None:
            self.t = torch.where(moved, self.t + dt, self.t)
        self.active = self.active & ~(moved & (res <= tol))
        if self.res_history is not None:
            self.res_history.append(self.res.clone())
            if self.t_history is not None and self.t is not None:
                self.t_history.append(self.t.clone())

    def _check_finite(self, moved: Tensor) -> None:
        bad = moved & ~(torch.isfinite(self.res) & torch.isfinite(self.tol))
        if bool(bad.any()):
            raise_nonfinite(self.name, self.steps)

    def finish(
        self,
        method: str,
        nfe: int,
        stop_reason: str,
        accepted: int | None = None,
        rejected: int | None = None,
    ) -> SolverStats:
        """The :class:`SolverStats` of the finished solve."""
        return SolverStats(
            method=method,
            nfe=nfe,
            steps=self.steps,
            residual=self.res,
            tolerance=self.tol,
            converged=self.res <= self.tol,
            wall_time=time.perf_counter() - self.start,
            stop_reason=stop_reason,
            accepted=accepted,
            rejected=rejected,
            t_final=self.t,
            residual_history=None if self.res_history is None else torch.stack(self.res_history),
            time_history=None if self.t_history is None else torch.stack(self.t_history),
        )
