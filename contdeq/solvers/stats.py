"""Statistics of one solve: why it stopped (:class:`StopReason`), what a loop returns
(:class:`LoopResult`), the :class:`SolverStats` assembled from it and the :class:`Solution`
the solvers return."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class StopReason(str, enum.Enum):
    """Why a solve stopped. A ``str`` subclass: each member equals its old string value
    (``StopReason.CONVERGED == "converged"``) and prints as it."""

    #: Every sample met its tolerance.
    CONVERGED = "converged"
    #: The step or iteration limit ``max_steps`` was hit.
    MAX_STEPS = "max_steps"
    #: Every unconverged sample reached the pseudo-time limit ``t_max``.
    T_MAX = "t_max"
    #: The wall-clock limit ``timeout`` was hit.
    TIMEOUT = "timeout"
    #: ``backend="event"``: the crossing located on the interpolant missed the tolerance at
    #: the returned state.
    EVENT = "event"
    #: A :class:`~contdeq.nn.NeuralODE` integrated to its end time (no steady-state test).
    T_END = "t_end"
    #: A :class:`~contdeq.nn.WeightTied` layer applied ``f`` its fixed number of times.
    DEPTH = "depth"
    #: A step callback returned :class:`~contdeq.solvers.callback.Stop`.
    CALLBACK = "callback"
    #: Every unconverged sample stopped making progress (no new smallest residual over the
    #: solver's stall window); each returns its best iterate.
    STALLED = "stalled"

    def __str__(self) -> str:
        return self.value


class LoopResult(NamedTuple):
    """What a solver loop returns: the final flat ``(B, D)`` state and how the loop ended.

    Attributes:
        z: ``(B, D)`` the returned state.
        stop_reason: why the loop stopped.
        accepted: accepted Runge-Kutta steps (``None`` where not observable or not applicable).
        rejected: rejected Runge-Kutta steps (``None`` likewise).
        jvps: Jacobian-vector products (Newton-Krylov methods; ``None`` elsewhere).
        linear_iterations: GMRES iterations (``None`` where no linear system is solved).
    """

    z: Tensor
    stop_reason: StopReason | str
    accepted: int | None = None
    rejected: int | None = None
    jvps: int | None = None
    linear_iterations: int | None = None


@dataclass
class SolverStats:
    """What a solve did, per sample where it differs between samples.

    Attributes:
        method: name of the method that ran (e.g. ``"dopri5"``, ``"anderson"``).
        nfe: number of evaluations of the user's function, counted exactly.
        steps: solver iterations (for Runge-Kutta methods: accepted + rejected steps).
        residual: ``(B,)`` norm of the residual (``dz/dt`` or ``g(z) - z``) at the returned z.
        tolerance: ``(B,)`` the tolerance ``atol + rtol * ||z||`` each sample had to meet.
        converged: ``(B,)`` bool, ``residual <= tolerance``.
        wall_time: seconds spent in the solve.
        stop_reason: a :class:`StopReason` (equal to its string: ``"converged"``,
            ``"max_steps"``, ``"t_max"``, ``"timeout"``, ``"event"``, ``"t_end"``,
            ``"depth"``, ``"callback"``, ``"stalled"``); a string given here is converted.
        accepted: accepted Runge-Kutta steps (``None`` where it does not apply).
        rejected: rejected Runge-Kutta steps (``None`` where it does not apply).
        t_final: ``(B,)`` pseudo-time at which each sample stopped (ODE solves only).
        residual_history: ``(K, B)`` residual after each accepted step, when recorded.
        time_history: ``(K, B)`` pseudo-time after each accepted step (ODE), when recorded.
        jvps: batched Jacobian-vector products of the user's function (Newton-Krylov methods:
            ``"implicit_ptc"``, ``"newton"``; ``None`` elsewhere). Not included in ``nfe``.
        linear_iterations: GMRES iterations summed over the solve's linear systems (each
            one batched product with the system's matrix; ``None`` where no linear system is
            solved).
        final_input: the input a step callback's ``Restart(x=...)`` left the function bound
            to (a layer's ``f(., x)``, :mod:`~contdeq.solvers.callback`); ``None`` where no
            callback changed it.
    """

    method: str
    nfe: int
    steps: int
    residual: Tensor
    tolerance: Tensor
    converged: Tensor
    wall_time: float
    stop_reason: StopReason
    accepted: int | None = None
    rejected: int | None = None
    t_final: Tensor | None = None
    residual_history: Tensor | None = None
    time_history: Tensor | None = None
    jvps: int | None = None
    linear_iterations: int | None = None
    final_input: Tensor | None = None

    def __post_init__(self) -> None:
        self.stop_reason = StopReason(self.stop_reason)

    @property
    def all_converged(self) -> bool:
        """True when every sample met its tolerance."""
        return self.converged.all().tolist()

    @property
    def max_residual(self) -> float:
        """Largest per-sample residual."""
        return float(self.residual.detach().max())

    def summary(self) -> str:
        """One line: method, NFE, steps, how many samples converged, worst residual."""
        n_conv = int(self.converged.sum())
        # Detached: the norms of an unrolled solve carry a graph (float() of one warns).
        residual, tolerance = self.residual.detach(), self.tolerance.detach()
        worst = int(torch.argmax(residual - tolerance))
        parts = [
            f"method={self.method}",
            f"nfe={self.nfe}",
            f"steps={self.steps}",
            f"converged={n_conv}/{self.converged.numel()}",
            f"stop={self.stop_reason}",
            f"worst sample {worst}: residual {float(residual[worst]):.3g}"
            f" vs tolerance {float(tolerance[worst]):.3g}",
        ]
        if self.jvps is not None:
            parts.insert(2, f"jvps={self.jvps}")
        if self.linear_iterations is not None:
            parts.insert(3, f"linear_iterations={self.linear_iterations}")
        if self.t_final is not None:
            parts.append(f"t_final<={float(self.t_final.detach().max()):.3g}")
        return ", ".join(parts)

    def __repr__(self) -> str:
        """The :meth:`summary` line: ``print(stats)`` stays short at any batch size (the
        per-sample tensors are the attributes ``residual``, ``converged``, ...)."""
        return f"SolverStats({self.summary()})"


class Solution(NamedTuple):
    """What :func:`~contdeq.solvers.steady_state` and :func:`~contdeq.solvers.fixed_point`
    return: a named pair that unpacks as ``z, stats = ...``.

    Attributes:
        z: the solution shaped like ``z0`` (``(B, ...)``, or a tuple of per-scale states):
            each sample's returned state (an unconverged sample's best iterate).
        stats: what the solve did (:class:`SolverStats`).
    """

    z: Tensor | tuple[Tensor, ...]
    stats: SolverStats

    @property
    def stop_reason(self) -> StopReason:
        """Why the solve stopped (``stats.stop_reason``)."""
        return self.stats.stop_reason

    @property
    def converged(self) -> Tensor:
        """``(B,)`` bool: which samples met their tolerance (``stats.converged``)."""
        return self.stats.converged
