"""State structures of the layers: one tensor (``Single``, the default, in ``deq.py``) or one
tensor per scale (:class:`Scales`, multi-scale).

The solvers always see one flat-per-sample state; a structure says how the user's ``f``,
``z0``, predictions and results map to it. :class:`Scales` wraps ``f(zs, x)`` in
:class:`ScalesCell`, which presents it as a function of one flat ``(B, N)`` state
(:func:`contdeq.solvers.flatten_states`), so every solver option, backward mode, statistic and
auxiliary loss works unchanged on multi-scale states, and a sample has converged when the
residual over all its scales together meets the tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..implicit.diagnostics import from_autocast
from ..solvers import concat_states, flatten_states, split_states, unflatten_states
from ..solvers.validation import Shapes, as_shape, check_state_shapes

__all__ = ["MultiScaleRepr", "Scales", "ScalesCell", "Structure", "check_state",
           "resolve_state_shape", "scales"]


def resolve_state_shape(state_shape: int | Sequence[int] | None) -> tuple[int, ...] | None:
    """Normalise a per-sample state shape argument (``None``: inferred at the first call)."""
    if state_shape is None:
        return None
    shape = as_shape(state_shape)
    if shape is None:
        raise ValueError(f"state_shape must be a positive int or a tuple of them, got "
                         f"{state_shape!r}")
    return shape


def check_state(z0: object, x: Tensor, shape: tuple[int, ...] | None, name: str) -> Tensor:
    """``z0`` is a ``(B, *shape)`` tensor with ``x``'s batch size, dtype and device."""
    if not isinstance(z0, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z0).__name__}")
    if z0.ndim == 0 or z0.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must have x's batch size {x.shape[0]} first, got shape "
                         f"{tuple(z0.shape)}")
    if shape is not None and tuple(z0.shape[1:]) != shape:
        raise ValueError(f"{name} must have shape (B, *state_shape) = "
                         f"{(x.shape[0], *shape)}, got {tuple(z0.shape)}")
    if z0.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {z0.dtype}: convert it "
                        f"with .to(x.dtype) (or convert x and the module to {z0.dtype})")
    if z0.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {z0.device}: move it "
                         f"with .to(x.device)")
    if not bool(torch.isfinite(z0).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return z0


class Structure:
    """How a layer's state is laid out: ``cell(f)`` is the map the solvers iterate,
    ``state_shape`` its per-sample shape (``None``: ``x``'s), ``pack``/``unpack`` convert a
    user state to and from the flat one, ``prediction`` checks a predicted start."""

    state_shape: tuple[int, ...] | None
    #: How ``f`` is called, for messages.
    contract = "f(z, x)"

    def cell(self, f: nn.Module) -> nn.Module:
        return f

    def pack(self, z0: Any) -> Any:
        return z0

    def unpack(self, z: Tensor) -> Any:
        return z

    def prediction(self, guess: object, x: Tensor) -> Tensor:
        raise NotImplementedError


class ScalesCell(nn.Module):
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


class Scales(Structure):
    """A tuple of tensors per sample, one per scale (MDEQ): ``f(zs, x) -> zs``.

    The layer's ``f`` becomes a :class:`ScalesCell` (``layer.f.f`` is the user's ``f``, its
    parameters ``f.f.*`` in the ``state_dict``); the solvers see the flat ``(B, N)`` state,
    ``N = sum_s prod(shapes[s])``; ``z0``, predictions and results are tuples.

    Args:
        shapes: per-sample shape of each scale, e.g. ``[(16, 8, 8), (32, 4, 4)]``.
    """

    contract = "f(zs, x) with zs a tuple of tensors"

    def __init__(self, shapes: Sequence[Sequence[int]]) -> None:
        self.shapes = check_state_shapes(shapes, "state_shapes")
        self.state_shape = (sum(math.prod(s) for s in self.shapes),)

    def cell(self, f: nn.Module) -> nn.Module:
        return ScalesCell(f, self.shapes)

    def pack(self, z0: Any) -> Any:
        return None if z0 is None else flatten_states(z0, shapes=self.shapes, name="z0")[0]

    def unpack(self, z: Tensor) -> tuple[Tensor, ...]:
        return unflatten_states(z, self.shapes, name="z*")

    def prediction(self, guess: object, x: Tensor) -> Tensor:
        """A tuple ``predictor(x)`` checked scale by scale, flattened to ``(B, N)``."""
        flat = flatten_states(guess, shapes=self.shapes, name="predictor(x)")[0]
        return check_state(from_autocast(flat, x), x, self.state_shape, "predictor(x)")

    def __repr__(self) -> str:
        return f"Scales({self.shapes})"


def scales(state_shapes: Sequence[Sequence[int]], kwargs: dict[str, Any]) -> Scales:
    """The ``Scales`` structure of a multi-scale layer's ``state_shapes`` (refusing a
    ``state_shape`` among its other keywords)."""
    if "state_shape" in kwargs:
        raise TypeError("multi-scale layers take state_shapes=[shape_1, shape_2, ...] (one "
                        "per-sample shape per scale), not state_shape")
    return Scales(state_shapes)


class MultiScaleRepr:
    """Mixin of the multi-scale short names: the ``state_shapes`` attribute, and
    ``state_shapes=...`` in the repr instead of the flat ``state_shape``."""

    structure: Scales

    def extra_repr(self) -> str:
        text = super().extra_repr()  # type: ignore[misc]
        text = text.replace(f", state_shape={self.structure.state_shape}", "")
        return f"{text}, state_shapes={self.state_shapes}"

    @property
    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The per-sample shapes, a tuple of tuples."""
        return self.structure.shapes
