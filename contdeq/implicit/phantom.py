"""Phantom gradients (Geng et al. 2021, torchdeq's ``grad=k``): the gradient of ``k`` damped
fixed-point steps ``z <- (1 - lambda) z + lambda f(z, x)`` taken from ``z*``.

Unrolling those ``k`` steps from an exact fixed point ``z*`` visits ``z*`` at every step, so
backpropagating through them gives the weights

    ``w = lambda * sum_{i<k} M^i v``,  ``M = (1 - lambda) I + lambda J^T``,  ``J = df/dz`` at ``z*``

of the final VJP ``w^T df/d(x, theta)``: ``k - 1`` vector-Jacobian products of the one graph
the backward already holds, no linear solve and no convergence test. ``k = 1`` is ``lambda``
times :class:`~contdeq.implicit.JFB`; ``lambda = 1`` is the truncated Neumann series
``v + J^T v + ... + (J^T)^(k-1) v``; as ``k`` grows, ``w`` tends to the implicit gradient's
``(I - J^T)^-1 v`` when ``f`` is contractive (``||M|| <= 1 - lambda (1 - ||J||) < 1``).

torchdeq unrolls the steps with autograd from the solver's ``z`` (which is only near ``z*``) and
returns the last iterate; here the forward returns ``z*`` unchanged and the steps use the
Jacobian at ``z*``: the two agree to the forward tolerance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..solvers import SolverStats
from ..solvers.validation import check_positive_int
from .backward import BACKWARD_MODES, BackwardMode
from .stats import DEQStats

__all__ = ["Phantom"]


@BACKWARD_MODES.register("phantom")
@dataclass(frozen=True)
class Phantom(BackwardMode):
    """Phantom gradient: backpropagation through ``steps`` damped fixed-point steps from ``z*``
    (``w = damping * sum_{i<steps} ((1 - damping) I + damping J^T)^i v``, ``v = dL/dz*`` and
    ``w`` shaped like ``(B, ...)`` ``z*``).

    Args:
        steps: the number ``k >= 1`` of unrolled steps (``k - 1`` VJPs).
        damping: ``lambda`` in ``(0, 1]``; torchdeq's ``tau`` (it recommends 0.5-0.7 for
            multi-scale DEQs, 1.0 for DEQ flow).

    An approximate gradient with a fixed cost: ``layer.stats.backward`` records ``nfe = steps -
    1`` VJPs with ``stop_reason="depth"`` (a fixed number of steps, no convergence test; its
    ``residual`` and ``tolerance`` are NaN).

    Example: ``DEQ(f, backward=Phantom(steps=5, damping=0.5))`` or ``backward="phantom"``.
    """

    steps: int = 5
    damping: float = 0.5

    def __post_init__(self) -> None:
        check_positive_int(self.steps, "steps")
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not (
            0.0 < float(self.damping) <= 1.0
        ):
            raise ValueError(f"damping must be a number in (0, 1], got {self.damping!r}")
        object.__setattr__(self, "damping", float(self.damping))

    def gradient_weights(self, vjp: Callable[[Tensor], Tensor], v: Tensor,
                         record: DEQStats | None) -> Tensor:
        """``w`` ``(B, ...)`` shaped like ``v``: ``damping * sum_{i<steps} M^i v``."""
        start = time.perf_counter()
        lam = self.damping
        with torch.no_grad():
            term = v
            total = v.clone()
            for _ in range(self.steps - 1):
                term = vjp(term).mul_(lam).add_(term, alpha=1.0 - lam)
                total.add_(term)
            w = total.mul_(lam)
        if record is not None:
            b = v.shape[0] if v.ndim > 0 else 1
            nan = v.new_full((b,), math.nan)
            record.backward = SolverStats(
                method=f"phantom(steps={self.steps}, damping={lam:g})", nfe=self.steps - 1,
                steps=self.steps - 1, residual=nan, tolerance=nan.clone(),
                converged=torch.ones(b, dtype=torch.bool, device=v.device),
                wall_time=time.perf_counter() - start, stop_reason="depth",
            )
        return w
