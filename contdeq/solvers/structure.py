"""Tuple-valued states: one tensor per scale, flattened into the solvers' ``(B, N)`` state.

A multi-scale model's state is a tuple ``(z_1, ..., z_S)`` of tensors ``(B, *shape_s)``
sharing the batch size, dtype and device. :func:`flatten_states` concatenates their per-sample
values into one ``(B, N)`` tensor (``N = sum_s prod(shape_s)``) and :func:`unflatten_states`
splits it back into views, so every solver, its per-sample convergence test (one residual norm
per sample, over all scales together) and the backward work on tuples unchanged.
:func:`solve_flattened` lets :func:`~contdeq.solvers.steady_state` and
:func:`~contdeq.solvers.fixed_point` take a tuple ``z0`` and a function of tuples.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .validation import Shapes, check_state_shapes

__all__ = ["concat_states", "flatten_states", "solve_flattened", "solver_arguments",
           "split_states", "unflatten_states"]


def flatten_states(
    zs: Sequence[Tensor], *, shapes: Sequence[Sequence[int]] | None = None, name: str = "zs"
) -> tuple[Tensor, Shapes]:
    """Concatenate per-scale states ``(B, *shape_s)`` into one ``(B, N)`` tensor.

    Args:
        zs: a non-empty tuple (or list) of tensors ``(B, *shape_s)`` with one batch size, dtype
            and device.
        shapes: if given, the per-sample shapes ``zs`` must have (one per scale).
        name: how error messages call ``zs``.

    Returns:
        ``(flat, shapes)``: ``flat`` ``(B, N)`` with ``N = sum_s prod(shape_s)``, and the
        per-sample shapes for :func:`unflatten_states`.

    Raises:
        TypeError: ``zs`` is not a tuple/list of tensors, or the dtypes differ.
        ValueError: wrong number of scales or shapes, batch sizes or devices differ.
    """
    if not isinstance(zs, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of tensors, one per scale, got "
                        f"{type(zs).__name__}")
    expected = None if shapes is None else check_state_shapes(shapes)
    if expected is not None and len(zs) != len(expected):
        raise ValueError(f"{name} must have {len(expected)} tensors (one per scale), got "
                         f"{len(zs)}")
    if not zs:
        raise ValueError(f"{name} must hold at least one tensor")
    first = zs[0]
    for i, z in enumerate(zs):
        if not isinstance(z, Tensor):
            raise TypeError(f"{name}[{i}] (scale {i}) must be a torch.Tensor, got "
                            f"{type(z).__name__}")
        if z.ndim < 2:
            raise ValueError(f"{name}[{i}] (scale {i}) must have shape (B, ...) with a "
                             f"per-sample shape, got {tuple(z.shape)}")
        if z.shape[0] != first.shape[0]:
            raise ValueError(f"{name}[{i}] (scale {i}) has batch size {z.shape[0]}, but "
                             f"{name}[0] has {first.shape[0]}")
        if z.dtype != first.dtype:
            raise TypeError(f"{name}[{i}] (scale {i}) has dtype {z.dtype}, but {name}[0] has "
                            f"{first.dtype}")
        if z.device != first.device:
            raise ValueError(f"{name}[{i}] (scale {i}) is on {z.device}, but {name}[0] is on "
                             f"{first.device}")
        if expected is not None and tuple(z.shape[1:]) != expected[i]:
            raise ValueError(f"{name}[{i}] (scale {i}) must have shape "
                             f"{(z.shape[0], *expected[i])} (per-sample shape {expected[i]}), "
                             f"got {tuple(z.shape)}")
    return concat_states(zs), tuple(tuple(z.shape[1:]) for z in zs)


def concat_states(zs: Sequence[Tensor]) -> Tensor:
    """:func:`flatten_states` without its checks: ``(B, *shape_s)`` tensors -> ``(B, N)``."""
    return torch.cat([z.reshape(z.shape[0], -1) for z in zs], dim=1)


def split_states(flat: Tensor, shapes: Shapes) -> tuple[Tensor, ...]:
    """:func:`unflatten_states` without its checks: ``(B, N)`` -> ``(B, *shape_s)`` views."""
    parts = flat.split([math.prod(shape) for shape in shapes], dim=1)
    return tuple(p.reshape(flat.shape[0], *shape) for p, shape in zip(parts, shapes, strict=True))


def unflatten_states(
    flat: Tensor, shapes: Sequence[Sequence[int]], *, name: str = "flat"
) -> tuple[Tensor, ...]:
    """Split a ``(B, N)`` tensor into per-scale views ``(B, *shape_s)``.

    The inverse of :func:`flatten_states`: ``N`` must equal ``sum_s prod(shape_s)``.

    Args:
        flat: ``(B, N)`` flattened states.
        shapes: the per-sample shapes, one per scale.
        name: how error messages call ``flat``.

    Returns:
        A tuple of tensors ``(B, *shape_s)`` (views of ``flat`` where its layout allows).
    """
    shapes = check_state_shapes(shapes)
    if not isinstance(flat, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(flat).__name__}")
    sizes = [math.prod(shape) for shape in shapes]
    if flat.ndim != 2 or flat.shape[1] != sum(sizes):
        raise ValueError(f"{name} must have shape (B, {sum(sizes)}) for the per-sample shapes "
                         f"{shapes}, got {tuple(flat.shape)}")
    return split_states(flat, shapes)


class _FlatFunction:
    """``fn(*args, flat) = flatten(fn_user(*args, unflatten(flat)))`` for the solvers."""

    def __init__(self, fn: Callable[..., Any], shapes: Shapes, name: str) -> None:
        self.fn = fn
        self.shapes = shapes
        self.name = name

    def __call__(self, *args: Any) -> Tensor:
        *leading, flat = args
        out = self.fn(*leading, unflatten_states(flat, self.shapes))
        return flatten_states(out, shapes=self.shapes, name=f"{self.name}'s output")[0]


def solver_arguments(solve: Callable[..., Any], arguments: dict[str, Any]
                     ) -> tuple[dict[str, Any], str, str]:
    """``solve``'s arguments (its ``locals()`` on entry) as keywords for a new call, with its
    ``**options`` spread out; also the names of its function and state arguments (its first
    two parameters)."""
    parameters = inspect.signature(solve).parameters
    fn_name, state_name = list(parameters)[:2]
    kwargs = dict(arguments)
    for name, p in parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(kwargs.pop(name))
    return kwargs, fn_name, state_name


def solve_flattened(solve: Callable[..., tuple[Tensor, Any]], arguments: dict[str, Any]
                    ) -> tuple[tuple[Tensor, ...], Any]:
    """Run ``solve(fn, z0, ...)`` on a tuple ``z0`` of per-scale states ``(B, *shape_s)``.

    ``arguments`` are ``solve``'s own arguments by name (its ``locals()`` on entry). ``fn`` is
    called with a tuple of such tensors as its last argument and must return one; the solve
    runs on the flattened ``(B, N)`` state, and ``(z, stats)`` comes back with ``z`` a tuple.
    """
    kwargs, fn_name, state_name = solver_arguments(solve, arguments)
    flat, shapes = flatten_states(kwargs[state_name], name=state_name)
    if callable(kwargs[fn_name]):
        kwargs[fn_name] = _FlatFunction(kwargs[fn_name], shapes, fn_name)
    kwargs[state_name] = flat
    z, stats = solve(**kwargs)
    return unflatten_states(z, shapes), stats
