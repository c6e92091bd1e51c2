"""Multi-scale layers: the state is a tuple of tensors, one per scale.

Each layer wraps the user's ``f(zs, x) -> zs`` in a private adapter that presents it to the
solvers as a function of one flat ``(B, N)`` state (:func:`contdeq.solvers.flatten_states`), and
otherwise *is* the single-scale layer (:class:`~contdeq.DEQ`, :class:`~contdeq.SkipDEQ`,
:class:`~contdeq.SkipRegDEQ`, :class:`~contdeq.NeuralODE`) with ``state_shape=(N,)``. So every
solver option, backward mode, statistic and auxiliary loss works unchanged, and a sample has
converged when the residual over all its scales together meets the tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..solvers import concat_states, flatten_states, split_states, unflatten_states
from ..solvers.validation import Shapes, check_state_shapes
from .deq import DEQ, SkipDEQ, SkipRegDEQ, check_state
from .node import NeuralODE

__all__ = ["MultiScaleDEQ", "MultiScaleNeuralODE", "MultiScaleSkipDEQ", "MultiScaleSkipRegDEQ"]


class _FlatCell(nn.Module):
    """``f_flat(z, x)`` on a flat ``(B, N)`` state for a user ``f(zs, x)`` on per-scale tuples.

    ``f`` is registered as the submodule ``f``, so its parameters are ``f.*`` here (``f.f.*``
    in the layer's ``state_dict``) and normalizations inside it are found by module walks.
    """

    def __init__(self, f: nn.Module, shapes: Shapes) -> None:
        super().__init__()
        self.f = f
        self.shapes = shapes
        # The shapes, dtypes and device of the last checked call's z and x: the solvers call f
        # dozens of times per solve with the same ones, so later calls skip the checks.
        self._checked: tuple[Any, ...] | None = None

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        """``z`` ``(B, N)``, ``x`` ``(B, ...)`` -> ``(B, N)``: ``f`` applied to the split state."""
        key = (tuple(z.shape), z.dtype, z.device, tuple(x.shape), x.dtype)
        if key == self._checked:
            out = self.f(split_states(z, self.shapes), x)
            if isinstance(out, tuple) and len(out) == len(self.shapes) and all(
                    isinstance(t, Tensor) and t.shape[1:] == s
                    for t, s in zip(out, self.shapes, strict=True)):
                return concat_states(out)
            return flatten_states(out, shapes=self.shapes, name="f(zs, x)")[0]  # raises
        zs = unflatten_states(z, self.shapes, name="z")
        try:
            out = self.f(zs, x)
        except RuntimeError as exc:
            shapes = [tuple(t.shape) for t in zs]
            raise RuntimeError(
                f"f(zs, x) failed with per-scale states zs of shapes {shapes} and x of shape "
                f"{tuple(x.shape)} (do state_shapes match f's channels and resolutions?). "
                f"The error was: {exc}"
            ) from exc
        flat = flatten_states(out, shapes=self.shapes, name="f(zs, x)")[0]
        self._checked = key
        return flat

    def extra_repr(self) -> str:
        return f"f(zs, x) on the per-sample shapes {self.shapes}"


class _MultiScale:
    """What the multi-scale layers add to their single-scale base: the adapter around ``f``,
    tuple ``z0`` in and tuple ``z*`` out. Comes first in the bases, before the layer class."""

    state_shape: tuple[int, ...]

    def __init__(self, f: nn.Module, *args: Any, state_shapes: Sequence[Sequence[int]],
                 **kwargs: Any) -> None:
        if not isinstance(f, nn.Module):
            raise TypeError(f"f must be an nn.Module called as f(zs, x) with zs a tuple of "
                            f"tensors, got {type(f).__name__}")
        if "state_shape" in kwargs:
            raise TypeError("multi-scale layers take state_shapes=[shape_1, shape_2, ...] (one "
                            "per-sample shape per scale), not state_shape")
        shapes = check_state_shapes(state_shapes, "state_shapes")
        size = sum(math.prod(s) for s in shapes)
        super().__init__(_FlatCell(f, shapes), *args, state_shape=(size,), **kwargs)
        self.state_shapes = shapes

    def forward(self, x: Tensor, z0: Sequence[Tensor] | None = None) -> tuple[Tensor, ...]:
        """``x`` ``(B, ...)`` -> tuple of per-scale tensors ``(B, *state_shapes[s])`` (views
        of one flat ``(B, N)`` result); ``z0`` an optional tuple of initial states."""
        flat = None if z0 is None else flatten_states(z0, shapes=self.state_shapes, name="z0")[0]
        z = super().forward(x, flat)  # type: ignore[misc]
        return unflatten_states(z, self.state_shapes, name="z*")

    def extra_repr(self) -> str:
        text = super().extra_repr().replace(f", state_shape={self.state_shape}", "")  # type: ignore[misc]
        return f"{text}, state_shapes={self.state_shapes}"


class MultiScaleDEQ(_MultiScale, DEQ):
    """:class:`~contdeq.DEQ` whose state is a tuple of tensors, one per scale (MDEQ).

    ``f`` is called as ``f(zs, x)`` with ``zs`` a tuple of tensors ``(B, *state_shapes[s])``
    and must return such a tuple. The solver sees the scales concatenated into one flat
    ``(B, N)`` state, so a sample has converged when its residual over *all* scales meets the
    tolerance, and every option of :class:`~contdeq.DEQ` applies (``solver``, ``backward``,
    ``eval_options``, ``jacobian_weight``, ``on_nonconvergence``, ...).

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
        super().__init__(f, state_shapes=state_shapes, **kwargs)


class MultiScaleSkipDEQ(_MultiScale, SkipDEQ):
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
        super().__init__(f, predictor, state_shapes=state_shapes, skip_weight=skip_weight,
                         skip_norm=skip_norm, skip_detach=skip_detach, **kwargs)

    def initial_state(self, x: Tensor, z0: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Flat ``(B, N)`` ``predictor(x)`` (checked scale by scale) and its graph; a given flat
        ``z0`` takes precedence and adds no skip term."""
        if z0 is not None:
            return super().initial_state(x, z0)
        guess = flatten_states(self.predictor(x), shapes=self.state_shapes,
                               name="predictor(x)")[0]
        guess = check_state(guess, x, self.state_shape, "predictor(x)")
        return guess, guess if guess.requires_grad else None


class MultiScaleSkipRegDEQ(_MultiScale, SkipRegDEQ):
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
        super().__init__(f, state_shapes=state_shapes, skip_weight=skip_weight,
                         skip_norm=skip_norm, skip_detach=skip_detach, **kwargs)


class MultiScaleNeuralODE(_MultiScale, NeuralODE):
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
        super().__init__(f, t_end, state_shapes=state_shapes, **kwargs)
