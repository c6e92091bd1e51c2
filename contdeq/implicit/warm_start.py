"""The implicit backward started from a guess remembered from the previous backward pass.

:class:`WarmImplicit` is :class:`~contdeq.implicit.Implicit` whose linear solve
``w = J^T w + v`` starts from a guess instead of ``w0 = v``. The guess only changes the number
of iterations: the solve meets the same tolerance, so the gradient is the implicit one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .backward import BACKWARD_MODES, Implicit, accepts_tol
from .stats import DEQStats

__all__ = ["WARM_STARTS", "WarmImplicit"]

#: The guesses :class:`WarmImplicit` can start from.
WARM_STARTS = ("previous", "scaled")


@BACKWARD_MODES.register("implicit_warm")
@accepts_tol
@dataclass(frozen=True)
class WarmImplicit(Implicit):
    """:class:`~contdeq.implicit.Implicit` with a warm-started linear solve.

    Args:
        start: the initial guess of ``w`` ``(B, ...)``:

            * ``"previous"``: the previous backward pass's ``w`` when it has ``v``'s shape,
              dtype and device (else ``v``: a batch-size change, the first call). Batches hold
              different samples, so this guess is of use only where consecutive ``v`` and
              ``J`` are alike (e.g. the same batch again).
            * ``"scaled"``: ``c v`` with the scalar ``c = <w, v> / <v, v>`` of the previous
              pass (its least-squares fit of ``w`` by ``v``; ``c = 1`` on the first call), a
              guess that carries over between batches of different samples.
        method, rtol, max_steps, options, on_nonconvergence, tol: as for
            :class:`~contdeq.implicit.Implicit`.

    The gradient is the implicit one to ``rtol``, but not bitwise reproducible: two backward
    passes of the same loss start from different guesses and differ within the tolerance.
    The remembered guess is kept per thread (threads share no guesses) and belongs to this
    object: give each layer its own (the layers' ``backward="implicit_warm"`` shorthand builds
    one per layer). Copies and pickles start without it. Evaluation runs no backward and leaves
    it unchanged.

    Example: ``DEQ(f, backward=WarmImplicit(start="scaled"))``.
    """

    remembers_between_calls: ClassVar[bool] = True
    start: str = "scaled"
    _memory: threading.local = field(default_factory=threading.local, init=False, repr=False,
                                     compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start not in WARM_STARTS:
            raise ValueError(f"start must be one of {WARM_STARTS}, got {self.start!r}")

    def gradient_weights(self, vjp: Callable[[Tensor], Tensor], v: Tensor,
                         record: DEQStats | None) -> Tensor:
        """``w`` ``(B, ...)`` solving ``w = J^T w + v``, started from the remembered guess."""
        w = self._solve(vjp, v, record, self._guess(v))
        if self.start == "previous":
            self._memory.previous = w.detach().clone()
        else:
            vv = float(torch.sum(v * v))
            self._memory.scale = float(torch.sum(w * v)) / vv if vv > 0 else 1.0
        return w

    def _guess(self, v: Tensor) -> Tensor | None:
        """The initial guess for ``v`` ``(B, ...)``, or ``None`` (start from ``v``)."""
        if self.start == "previous":
            w = getattr(self._memory, "previous", None)
            fits = (w is not None and w.shape == v.shape and w.dtype == v.dtype
                    and w.device == v.device)
            return w if fits else None
        scale = getattr(self._memory, "scale", None)
        return None if scale is None else v * scale

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_memory")  # a threading.local (not picklable); copies start afresh
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        object.__setattr__(self, "_memory", threading.local())
