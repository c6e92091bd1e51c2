"""Solver statistics of an equilibrium layer's last call, forward and backward."""

from __future__ import annotations

from dataclasses import dataclass

from ..solvers import SolverStats

__all__ = ["DEQStats"]


@dataclass
class DEQStats:
    """Solver statistics of a layer's last call.

    Attributes:
        forward: the forward solve (:class:`~contdeq.solvers.SolverStats`).
        backward: the backward linear solve, filled in when ``backward()`` has run through the
            layer; ``None`` before that, and for ``"jfb"`` and ``"unrolled"`` (no linear solve)
            or a :class:`~contdeq.nn.NeuralODE` without adjoint.
    """

    forward: SolverStats
    backward: SolverStats | None = None

    def summary(self) -> str:
        """Two short lines: forward and backward."""
        back = "not run" if self.backward is None else self.backward.summary()
        return f"forward: {self.forward.summary()}\nbackward: {back}"

    def __repr__(self) -> str:
        """Short, as :meth:`summary` on one line (the solves' per-sample tensors are in
        ``forward`` and ``backward``)."""
        return "DEQStats(" + self.summary().replace("\n", "; ") + ")"
