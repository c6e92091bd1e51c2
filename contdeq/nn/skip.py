"""The Skip layers' short names: :class:`SkipDEQ` (``init=Predictor(net)``) and
:class:`SkipRegDEQ` (``init=FZero()``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .deq import DEQ
from .init import FZero, Predictor

__all__ = ["SkipDEQ", "SkipRegDEQ"]


class SkipDEQ(DEQ):
    """DEQ whose initial state is an explicit prediction: ``z0 = predictor(x)``; the short
    name of ``DEQ(f, init=Predictor(predictor, weight=skip_weight, norm=skip_norm,
    detach=skip_detach))``.

    Training adds ``skip_weight * mean((predictor(x) - sg(z*))^2)`` (``skip_norm="l2"``) or
    ``skip_weight * mean(|predictor(x) - sg(z*)|)`` (``"l1"``) to :func:`contdeq.aux_loss`;
    ``sg`` is stop-gradient, so the term trains the predictor (and, through ``predictor(x)``,
    whatever computes ``x``, e.g. an encoder before the layer), and ``z*`` (independent of
    ``z0`` at convergence) gets no gradient from it: ``f`` is not trained by the term.
    ``skip_detach=False`` lets the gradient reach ``z*`` too, as in Pal et al. (2022) /
    DeepEquilibriumNetworks.jl (which use ``skip_norm="l1"`` and ``skip_weight`` 5 on MNIST):
    ``f`` is then also pulled toward equilibria the predictor reaches, which cuts solver steps
    at some cost in accuracy. See ``docs/layers.md`` for the sources.

    Args:
        f: as for :class:`DEQ`.
        predictor: ``nn.Module``, ``x -> (B, *state_shape)``; defines the state shape when
            ``state_shape`` is not given.
        skip_weight: the weight ``lambda`` of the skip term (default 1).
        skip_norm: ``"l2"`` (default) or ``"l1"``.
        skip_detach: stop the skip term's gradient at ``z*`` (default ``True``).
        **kwargs: the options of :class:`DEQ` (``structure``, ``modifiers``, ...).

    Shapes: ``x`` ``(B, ...)`` -> ``z*`` shaped like ``predictor(x)``.
    """

    def __init__(self, f: nn.Module, predictor: nn.Module, *, skip_weight: float = 1.0,
                 skip_norm: str = "l2", skip_detach: bool = True, **kwargs: Any) -> None:
        init = Predictor(predictor, weight=skip_weight, norm=skip_norm, detach=skip_detach)
        super().__init__(f, init=init, **kwargs)

    @property
    def skip_weight(self) -> float:
        """The skip term's weight."""
        return self.init.weight

    @property
    def skip_norm(self) -> str:
        """The skip term's norm, ``"l2"`` or ``"l1"``."""
        return self.init.norm

    @property
    def skip_detach(self) -> bool:
        """Whether the skip term's gradient stops at ``z*``."""
        return self.init.detach

    def extra_repr(self) -> str:
        return _skip_repr(self)


class SkipRegDEQ(DEQ):
    """DEQ with the Skip-Reg initial state ``z0 = f(0, x)``: no extra network; the short name
    of ``DEQ(f, init=FZero(weight=skip_weight, norm=skip_norm, detach=skip_detach))``.

    Training adds ``skip_weight * mean((f(0, x) - sg(z*))^2)`` (or the ``"l1"`` mean absolute
    difference) to :func:`contdeq.aux_loss`; it trains ``f`` so that one application from zero
    already lands near the equilibrium (``skip_detach=False``: and the equilibrium near that
    first application, as in :class:`SkipDEQ`). DeepEquilibriumNetworks.jl builds this layer as
    ``DEQ(model, solver; init=nothing)``, whose initial condition is ``model((zero(x), x))``.

    Args:
        f: as for :class:`DEQ`.
        skip_weight: the weight ``lambda`` (default 1).
        skip_norm: ``"l2"`` (default) or ``"l1"``.
        skip_detach: stop the skip term's gradient at ``z*`` (default ``True``).
        **kwargs: the options of :class:`DEQ` (``state_shape`` sets the shape of the zero
            state passed to ``f``; default ``x``'s shape).

    Shapes: ``x`` ``(B, ...)`` -> ``z*`` ``(B, *state_shape)``.
    """

    def __init__(self, f: nn.Module, *, skip_weight: float = 1.0, skip_norm: str = "l2",
                 skip_detach: bool = True, **kwargs: Any) -> None:
        init = FZero(weight=skip_weight, norm=skip_norm, detach=skip_detach)
        super().__init__(f, init=init, **kwargs)

    skip_weight = SkipDEQ.skip_weight
    skip_norm = SkipDEQ.skip_norm
    skip_detach = SkipDEQ.skip_detach

    def extra_repr(self) -> str:
        return _skip_repr(self)


def _skip_repr(layer: DEQ) -> str:
    skip = layer.init
    return (f"{DEQ.extra_repr(layer)}, skip_weight={skip.weight:g}, "  # type: ignore[attr-defined]
            f"skip_norm={skip.norm!r}, skip_detach={skip.detach}")  # type: ignore[attr-defined]
