"""Multi-scale layers: the state is a tuple of tensors, one per scale.

Each is the single-scale layer (:class:`~contdeq.DEQ`, :class:`~contdeq.SkipDEQ`,
:class:`~contdeq.SkipRegDEQ`, :class:`~contdeq.NeuralODE`) with the state structure
``Scales(state_shapes)`` (:mod:`contdeq.nn.structure`): the user's ``f(zs, x) -> zs`` is
presented to the solvers as a function of one flat ``(B, N)`` state, so every solver option,
backward mode, statistic and auxiliary loss works unchanged, and a sample has converged when
the residual over all its scales together meets the tolerance. The classes below are short
names: ``MultiScaleSkipDEQ(f, p, state_shapes=s)`` is ``SkipDEQ(f, p, structure=Scales(s))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .deq import DEQ
from .node import NeuralODE
from .skip import SkipDEQ, SkipRegDEQ
from .structure import MultiScaleRepr, scales

__all__ = ["MultiScaleDEQ", "MultiScaleNeuralODE", "MultiScaleSkipDEQ", "MultiScaleSkipRegDEQ"]


class MultiScaleDEQ(MultiScaleRepr, DEQ):
    """:class:`~contdeq.DEQ` whose state is a tuple of tensors, one per scale (MDEQ):
    ``DEQ(f, structure=Scales(state_shapes))``.

    ``f`` is called as ``f(zs, x)`` with ``zs`` a tuple of tensors ``(B, *state_shapes[s])``
    and must return such a tuple. The solver sees the scales concatenated into one flat
    ``(B, N)`` state, so a sample has converged when its residual over *all* scales meets the
    tolerance, and every option of :class:`~contdeq.DEQ` applies (``solver``, ``backward``,
    ``eval_options``, ``jacobian_weight``, ``on_nonconvergence``, ``init``, ``modifiers``, ...).

    Args:
        f: ``nn.Module``, ``f(zs, x) -> tuple`` shaped like ``zs`` (e.g.
            :class:`~contdeq.MultiScaleCell`). ``layer.f`` is the adapter, ``layer.f.f`` is
            ``f``; its parameters appear as ``f.f.*`` in the ``state_dict``.
        state_shapes: per-sample shape of each scale, e.g. ``[(16, 8, 8), (32, 4, 4)]``.
        **kwargs: the options of :class:`~contdeq.DEQ` (not ``state_shape``).

    Attributes:
        stats: as for :class:`~contdeq.DEQ`; residuals are over all scales of a sample.
        state_shapes: the per-sample shapes, a tuple of tuples.

    Shapes: ``x`` ``(B, ...)`` -> tuple of ``(B, *state_shapes[s])``, ``s = 0 .. S-1``. The
    methods inherited from :class:`~contdeq.DEQ` that take a state (``initial_state``) work on
    the flat ``(B, N)`` state, ``N = sum_s prod(state_shapes[s])``.
    """

    def __init__(self, f: nn.Module, *, state_shapes: Sequence[Sequence[int]],
                 **kwargs: Any) -> None:
        super().__init__(f, structure=scales(state_shapes, kwargs), **kwargs)


class MultiScaleSkipDEQ(MultiScaleRepr, SkipDEQ):
    """:class:`~contdeq.SkipDEQ` on tuple states: ``predictor(x)`` returns one tensor per scale.

    The skip term is ``skip_weight * mean((predictor(x) - sg(z*))^2)`` over all scales'
    elements together (as for :class:`~contdeq.SkipDEQ`).

    Args:
        f: as for :class:`MultiScaleDEQ`.
        predictor: ``nn.Module``, ``x -> tuple`` of tensors ``(B, *state_shapes[s])``.
        state_shapes: per-sample shape of each scale.
        skip_weight: the weight of the skip term (default 1).
        skip_norm: ``"l2"`` (default) or ``"l1"``.
        skip_detach: stop the skip term's gradient at ``z*`` (default ``True``; see
            :class:`~contdeq.SkipDEQ`).
        **kwargs: the options of :class:`~contdeq.DEQ`.

    Shapes: ``x`` ``(B, ...)`` -> tuple of ``(B, *state_shapes[s])``.
    """

    def __init__(self, f: nn.Module, predictor: nn.Module, *,
                 state_shapes: Sequence[Sequence[int]], skip_weight: float = 1.0,
                 skip_norm: str = "l2", skip_detach: bool = True, **kwargs: Any) -> None:
        super().__init__(f, predictor, structure=scales(state_shapes, kwargs),
                         skip_weight=skip_weight, skip_norm=skip_norm, skip_detach=skip_detach,
                         **kwargs)


class MultiScaleSkipRegDEQ(MultiScaleRepr, SkipRegDEQ):
    """:class:`~contdeq.SkipRegDEQ` on tuple states: ``z0 = f(0, x)`` with ``0`` a tuple of
    zero tensors, and the skip term over all scales together.

    Args:
        f: as for :class:`MultiScaleDEQ`.
        state_shapes: per-sample shape of each scale.
        skip_weight: the weight of the skip term (default 1).
        skip_norm: ``"l2"`` (default) or ``"l1"``.
        skip_detach: stop the skip term's gradient at ``z*`` (default ``True``; see
            :class:`~contdeq.SkipDEQ`).
        **kwargs: the options of :class:`~contdeq.DEQ`.

    Shapes: ``x`` ``(B, ...)`` -> tuple of ``(B, *state_shapes[s])``.
    """

    def __init__(self, f: nn.Module, *, state_shapes: Sequence[Sequence[int]],
                 skip_weight: float = 1.0, skip_norm: str = "l2", skip_detach: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(f, structure=scales(state_shapes, kwargs), skip_weight=skip_weight,
                         skip_norm=skip_norm, skip_detach=skip_detach, **kwargs)


class MultiScaleNeuralODE(MultiScaleRepr, NeuralODE):
    """:class:`~contdeq.NeuralODE` on tuple states: ``zs(t_end)`` of ``dzs/dt = f(zs, x) - zs``.

    Integrates the same flat vector field as a continuous :class:`MultiScaleDEQ` with the same
    ``f``, from zeros (or a given tuple ``z0``) to ``t_end``.

    Args:
        f: as for :class:`MultiScaleDEQ`.
        t_end: integration time (> 0).
        state_shapes: per-sample shape of each scale.
        **kwargs: the options of :class:`~contdeq.NeuralODE` (``method``, ``adjoint``,
            ``rtol``, ``atol``, ...; not ``state_shape``).

    Shapes: ``x`` ``(B, ...)`` -> tuple of ``(B, *state_shapes[s])``.
    """

    def __init__(self, f: nn.Module, t_end: float = 1.0, *,
                 state_shapes: Sequence[Sequence[int]], **kwargs: Any) -> None:
        super().__init__(f, t_end, structure=scales(state_shapes, kwargs), **kwargs)
