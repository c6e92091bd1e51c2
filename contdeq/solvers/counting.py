"""Wrappers that count and check every call of the user's function."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .validation import check_func_output


class CountedODEFunc:
    """``func(t, z)`` on flat ``(B, D)`` states: reshapes and counts each call.

    The first output is checked in full (type, shape, dtype, device); later ones for shape.
    """

    def __init__(self, func: Callable[[Tensor, Tensor], Tensor], z0: Tensor, name: str) -> None:
        self.func = func
        self.shape = z0.shape
        self.flat_shape = (z0.shape[0], z0[0].numel())
        self.dtype = z0.dtype
        self.device = z0.device
        self.name = name
        self.calls = 0
        self._time: tuple[float, Tensor] | None = None  # the last float time and its tensor

    def __call__(self, t: Tensor | float, z_flat: Tensor) -> Tensor:
        if not isinstance(t, Tensor):
            if self._time is None or self._time[0] != t:
                self._time = (t, torch.scalar_tensor(t, dtype=self.dtype, device=self.device))
            t = self._time[1]
        z = z_flat if self.shape == self.flat_shape else z_flat.reshape(self.shape)
        out = self.func(t, z)
        if self.calls == 0 or not isinstance(out, Tensor) or out.shape != self.shape:
            check_func_output(out, z, self.name)
        self.calls += 1
        return out if self.shape == self.flat_shape else out.reshape(self.flat_shape)


class CountedMap:
    """``g(z)`` on flat ``(B, D)`` states: reshapes and counts each call (checked as above)."""

    def __init__(self, g: Callable[[Tensor], Tensor], z0: Tensor, name: str) -> None:
        self.g = g
        self.shape = z0.shape
        self.flat_shape = (z0.shape[0], z0[0].numel())
        self.name = name
        self.calls = 0

    def __call__(self, z_flat: Tensor) -> Tensor:
        z = z_flat if self.shape == self.flat_shape else z_flat.reshape(self.shape)
        out = self.g(z)
        if self.calls == 0 or not isinstance(out, Tensor) or out.shape != self.shape:
            check_func_output(out, z, self.name)
        self.calls += 1
        return out if self.shape == self.flat_shape else out.reshape(self.flat_shape)
