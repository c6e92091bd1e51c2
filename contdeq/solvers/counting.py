"""Wrappers that count and check every call of the user's function.

Each call also checks that the function left its input alone: a function that modifies ``z``
in place (``z += ...``, ``z.clamp_(...)``) corrupts the solver's state, stage inputs and stored
iterates, and the solve would report convergence at a wrong point. The check reads the
tensor's version counter before and after the call (no tensor operation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .validation import check_func_output


def _version(z: Tensor) -> int:
    """``z``'s version counter (bumped by every in-place change); -1 for inference tensors,
    which have none (under ``torch.inference_mode`` the check is off)."""
    return -1 if z.is_inference() else z._version


def _raise_modified_input(name: str) -> None:
    raise ValueError(
        f"{name} modified its input state in place (e.g. z += ..., z.mul_(...), "
        f"z[...] = ...); this corrupts the solve. Compute a new tensor instead "
        f"(z = z + ..., or work on z.clone())"
    )


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
        self._times: dict[float, Tensor] = {}  # the times of the coming calls (prepare_times)

    def prepare_times(self, times: Sequence[float]) -> None:
        """Make the 0-dim tensors of the times the next calls will pass as floats (a
        Runge-Kutta step's stage times) in one tensor operation instead of one per call."""
        values = torch.tensor(times, dtype=self.dtype, device=self.device).unbind()
        self._times = dict(zip(times, values, strict=True))

    def __call__(self, t: Tensor | float, z_flat: Tensor) -> Tensor:
        if not isinstance(t, Tensor):
            prepared = self._times.get(t)
            if prepared is not None:
                t = prepared
            else:
                if self._time is None or self._time[0] != t:
                    self._time = (t, torch.scalar_tensor(t, dtype=self.dtype,
                                                         device=self.device))
                t = self._time[1]
        z = z_flat if self.shape == self.flat_shape else z_flat.reshape(self.shape)
        version = _version(z_flat)
        out = self.func(t, z)
        if _version(z_flat) != version:
            _raise_modified_input(self.name)
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
        version = _version(z_flat)
        out = self.g(z)
        if _version(z_flat) != version:
            _raise_modified_input(self.name)
        if self.calls == 0 or not isinstance(out, Tensor) or out.shape != self.shape:
            check_func_output(out, z, self.name)
        self.calls += 1
        return out if self.shape == self.flat_shape else out.reshape(self.flat_shape)
