"""The per-step hook of every solver loop: what a step callback sees and what it may answer.

A callback ``callback(info) -> action`` given to :func:`~contdeq.solvers.steady_state`,
:func:`~contdeq.solvers.fixed_point` or a layer (``layer.callback``) runs once after every
solver iteration that accepted a step: after each accepted Runge-Kutta step (rejected trials
are not shown), after each iteration of ``"ptc"``/``"implicit_ptc"`` (each sample accepts or
rejects its own trial; ``info.active`` tells which are still iterating) and after each
fixed-point iteration. It is not called for the initial state. ``info`` is a
:class:`StepInfo`; the callback answers

* ``None``: go on;
* :class:`Stop` ``()``: end the solve now; ``stats.stop_reason`` is ``"callback"`` (unless
  every sample had converged anyway), unconverged samples are reported as such
  (``on_nonconvergence``) and return their best iterate, as at any other limit;
* :class:`Restart` ``(z=None, x=None)``: the function changed (the callback modified what it
  depends on) and/or the state is replaced by ``z``: the function is evaluated once more at
  the (new) state (one extra call, counted in ``stats.nfe``), every sample is tested afresh,
  and the method's history restarts (Anderson/Broyden memory, Newton's kept values, the step
  size controller's residual history); ``x`` (a new input of the layer) is for layer
  callbacks only.

Without a callback the loops do nothing extra: one ``is None`` test per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Restart", "StepCallback", "StepHook", "StepInfo", "Stop"]


@dataclass(slots=True)
class StepInfo:
    """What a step callback sees after a solver step (a fresh object per step: assigning to
    its fields changes nothing in the solve; not frozen, which would cost ~3 us per step).

    Attributes:
        step: solver iterations so far (``stats.steps`` at this point: rejected Runge-Kutta
            trials included).
        z: ``(B, ...)`` the current state, shaped like the solver's ``z0`` (a tuple state is
            shown flattened, ``(B, N)``; a 1-D state as ``(1, D)``). Read-only: return
            :class:`Restart` to change it.
        residual: ``(B,)`` RMS residual norm of each sample at ``z`` (``dz/dt`` or
            ``g(z) - z``; a frozen sample's when it froze).
        active: ``(B,)`` bool, samples that have not converged yet.
        t: ``(B,)`` float64 pseudo-time each sample has reached (``steady_state``), ``None``
            for ``fixed_point``.
        method: the method's name (``"dopri5"``, ``"anderson"``, ...).
        x: the layer's current input ``(B, ...)`` (layer callbacks only; ``None`` otherwise).
    """

    step: int
    z: Tensor
    residual: Tensor
    active: Tensor
    t: Tensor | None
    method: str
    x: Tensor | None = None


@dataclass(frozen=True)
class Stop:
    """A callback's answer: end the solve now (``stats.stop_reason == "callback"``)."""


@dataclass(frozen=True)
class Restart:
    """A callback's answer: the function changed and/or the state is replaced.

    Attributes:
        z: ``(B, ...)`` new state shaped like :attr:`StepInfo.z` (``None``: keep it).
        x: ``(B, ...)`` new layer input shaped like :attr:`StepInfo.x` (layer callbacks only;
            ``None``: keep it).
    """

    z: Tensor | None = None
    x: Tensor | None = None


#: ``callback(info) -> None | Stop() | Restart(...)``.
StepCallback = Callable[[StepInfo], "Stop | Restart | None"]


class StepHook:
    """Runs a step callback for a loop on flat ``(B, D)`` states and interprets its answer.

    Args:
        callback: the user's callback.
        method: the method's name, for :attr:`StepInfo.method`.
        shape: the state's shape as the callback sees it (the counted function's ``shape``).
        function: the solve's counted function (:mod:`contdeq.solvers.counting`); where it is
            bound to an input ``x`` (a layer's ``f(., x)``), the callback sees that input
            (:attr:`StepInfo.x`) and a ``Restart(x=...)`` rebinds the function to the new one
            for the rest of the solve. ``None``: the solve has no input.
    """

    def __init__(self, callback: StepCallback, method: str, shape: torch.Size,
                 function: Any = None) -> None:
        self.callback = callback
        self.method = method
        self.shape = shape
        self.function = function

    def __call__(self, progress: Any, z: Tensor) -> Tensor | None:
        """Call back after a step at flat state ``z`` (``progress``: the loop's
        :class:`~contdeq.solvers.progress.Progress`). Returns ``None`` to go on (after a
        :class:`Stop`, ``progress`` is halted), or the flat ``(B, D)`` state to restart from."""
        view = z if z.shape == self.shape else z.reshape(self.shape)
        x = None if self.function is None else self.function.input
        info = StepInfo(progress.steps, view, progress.res, progress.active, progress.t,
                        self.method, x)
        action = self.callback(info)
        if action is None:
            return None
        if isinstance(action, Stop):
            progress.halted = True
            return None
        if not isinstance(action, Restart):
            raise TypeError(f"callback must return None, Stop() or Restart(...), got "
                            f"{type(action).__name__}")
        if action.x is not None:
            self._rebind(action.x, x)
        if action.z is None:
            return z
        new = action.z
        if not isinstance(new, Tensor) or new.shape != self.shape or new.dtype != z.dtype or (
                new.device != z.device):
            got = (f"{tuple(new.shape)}, {new.dtype}, {new.device}" if isinstance(new, Tensor)
                   else type(new).__name__)
            raise ValueError(f"callback returned Restart(z=...) with z of shape, dtype, device "
                             f"{got}; expected {tuple(self.shape)}, {z.dtype}, {z.device}")
        return new.reshape(z.shape)

    def _rebind(self, new: object, x: Tensor | None) -> None:
        """Apply ``Restart(x=new)``: the counted function is evaluated at ``new`` (detached)
        from now on; ``x`` is the input it had."""
        if x is None:
            raise ValueError("callback returned Restart(x=...), but this solve has no input x: "
                             "x is a layer's input (set layer.callback); for steady_state or "
                             "fixed_point, change what the function captures and return "
                             "Restart()")
        if not isinstance(new, Tensor) or new.shape != x.shape or new.dtype != x.dtype or (
                new.device != x.device):
            got = (f"{tuple(new.shape)}, {new.dtype}, {new.device}" if isinstance(new, Tensor)
                   else type(new).__name__)
            raise ValueError(f"callback returned Restart(x=...) with x of shape, dtype, device "
                             f"{got}; expected the layer input's {tuple(x.shape)}, {x.dtype}, "
                             f"{x.device}")
        self.function.rebind(new.detach())
