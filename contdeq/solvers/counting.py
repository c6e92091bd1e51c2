"""The one wrapper around every call of the user's function: counting, checks, residual form
and autocast in a single object (:class:`CountedODEFunc`, :class:`CountedMap`).

A solve is handed the user's function, possibly described by two small objects that are not
wrappers on the call path but instructions to the counted wrapper, which unwraps them:

* :class:`Residual` ``(fx)``: ``func(t, z) = fx(z) - z``, the steady-state form of a fixed
  point map (``t`` is not passed on, so no time tensor is made);
* :class:`BoundInput` ``(f, x)``: ``fx(z) = f(z, x)``, a function with its input ``x`` bound,
  the messages of its first-call and output checks (a layer subclasses it with hints on how
  its state is chosen), and the ``torch.autocast`` state ``f`` computes in. A step callback's
  ``Restart(x=...)`` replaces the input of the solve's counted wrapper (:meth:`rebind`); the
  :class:`BoundInput` itself is never changed.

Each call also checks that the function left its input alone: a function that modifies ``z``
in place (``z += ...``, ``z.clamp_(...)``) corrupts the solver's state, stage inputs and stored
iterates, and the solve would report convergence at a wrong point. The check reads the
tensor's version counter before and after the call (no tensor operation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .validation import check_func_output

__all__ = ["BoundInput", "CountedMap", "CountedODEFunc", "Residual"]

#: ``(device_type, dtype)`` of the ``torch.autocast`` a function computes in.
Autocast = tuple[str, torch.dtype]
State = Tensor | tuple[Tensor, ...]


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


class BoundInput:
    """``fx(z) = f(z, x)``: ``f`` with its input ``x`` bound (``(B, ...)``, passed unchanged).

    The counted wrapper of a solve calls ``f(z, x)`` itself (one wrapper per call); calling
    the object directly (``fx(z)``, e.g. from a map built around it) evaluates the same, its
    first call checked. Subclasses refine the checks' messages (:meth:`first_call`,
    :meth:`check`).

    Args:
        f: called as ``f(z, x)``, returning a tensor shaped like ``z``.
        x: the bound input.
        name: ``f``'s name in messages.
        autocast: ``(device_type, dtype)``: ``f`` computes under ``torch.autocast`` to
            ``dtype``, its floating output cast to the state's dtype; ``None``: as it is.
    """

    def __init__(self, f: Callable[[Tensor, Tensor], Tensor], x: Tensor, name: str = "f",
                 autocast: Autocast | None = None) -> None:
        self.f = f
        self.x = x
        self.name = name
        self.autocast = autocast
        self.checked = False  # a cache: the first call was checked (by any caller)

    def evaluate(self, z: Tensor, x: Tensor) -> Tensor:
        """``f(z, x)``, under the autocast state, in ``z``'s dtype."""
        if self.autocast is None:
            return self.f(z, x)
        with torch.autocast(self.autocast[0], dtype=self.autocast[1]):
            out = self.f(z, x)
        return out.to(z.dtype) if isinstance(out, Tensor) and out.is_floating_point() else out

    def first_call(self, z: Tensor, x: Tensor) -> Tensor:
        """:meth:`evaluate`, its output checked (:meth:`check`)."""
        out = self.check(self.evaluate(z, x), z)
        self.checked = True
        return out

    def check(self, out: object, z: Tensor) -> Tensor:
        """``out`` must be a tensor shaped, typed and placed like the state ``z``."""
        return check_func_output(out, z, f"{self.name}(z, x)")

    def with_input(self, x: Tensor) -> BoundInput:
        """The same ``f`` bound to the input ``x`` (a new object)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.x = x
        return new

    def __call__(self, z: Tensor) -> Tensor:
        """``f(z, x)`` for a ``(B, ...)`` state ``z``, shaped like ``z``."""
        if self.checked:
            return self.evaluate(z, self.x)
        return self.first_call(z, self.x)


class Residual:
    """``func(t, z) = fx(z) - z`` (per part for a tuple state; ``t`` is not used).

    Given to :func:`~contdeq.solvers.steady_state` as ``func``, it is unwrapped by the
    counted wrapper, which calls ``fx`` (or the ``f`` of a :class:`BoundInput` ``fx``) and
    subtracts ``z`` itself.
    """

    def __init__(self, fx: Callable[[State], State]) -> None:
        self.fx = fx

    def __call__(self, t: Tensor | float, z: State) -> State:
        out = self.fx(z)
        if isinstance(z, tuple):
            return tuple(o - s for o, s in zip(out, z, strict=True))
        return out - z

    def with_input(self, x: Tensor) -> Residual:
        """The residual of ``fx`` bound to the input ``x``."""
        return Residual(self.fx.with_input(x))  # type: ignore[attr-defined]


class _Counted:
    """What the two counted wrappers share: the unwrapped function, its checks, the count,
    and the call itself (one ``__call__``, so ``f`` is one frame below the solver's step)."""

    #: Whether the wrapped function is called as ``func(t, z)`` (else ``g(z)``).
    timed = False

    def __init__(self, fn: Callable[..., Tensor], z0: Tensor, name: str) -> None:
        self.shape = z0.shape
        self.flat_shape = (z0.shape[0], math.prod(z0.shape[1:]))
        self.flat = self.shape == self.flat_shape
        self.dtype = z0.dtype
        self.device = z0.device
        self.name = name
        self.calls = 0
        self.rebound = False
        self._unwrap(fn)

    def _unwrap(self, fn: Callable[..., Tensor]) -> None:
        """Read the call off ``fn``: ``residual`` (subtract ``z``), ``bound`` (a
        :class:`BoundInput`, whose ``f``, ``x`` and autocast state are called directly) and
        ``inner`` (the callable otherwise)."""
        self.residual = isinstance(fn, Residual)
        # Whether ``fn`` is a user's ``func(t, z)`` to be given the time (not a map, not a
        # Residual, which does not use it).
        self.takes_time = self.timed and not self.residual
        inner = fn.fx if isinstance(fn, Residual) else fn
        self.bound = inner if isinstance(inner, BoundInput) else None
        self.inner = inner
        if self.bound is not None:
            self.f, self.x, self.autocast = self.bound.f, self.bound.x, self.bound.autocast
        else:
            self.f, self.x, self.autocast = None, getattr(inner, "x", None), None

    @property
    def input(self) -> Tensor | None:
        """The input ``x`` the function is bound to now (``None``: it has none)."""
        return self.x

    @property
    def final_input(self) -> Tensor | None:
        """The input a step callback rebound the function to (:meth:`rebind`), ``None`` if
        none did."""
        return self.x if self.rebound else None

    def rebind(self, x: Tensor) -> None:
        """Evaluate the function at the input ``x`` from now on (a step callback's
        ``Restart(x=...)``); the function given to the solve is not changed."""
        fn = self._function()
        inner = fn.fx if isinstance(fn, Residual) else fn
        if not hasattr(inner, "with_input"):
            raise ValueError(f"a step callback returned Restart(x=...), but {self.name} "
                             f"({type(inner).__name__}) cannot be bound to another input")
        self._set_function(fn.with_input(x))  # type: ignore[attr-defined]
        self._unwrap(self._function())
        self.rebound = True

    def __call__(self, *args: Any) -> Tensor:
        """``func(t, z_flat)`` (:class:`CountedODEFunc`) or ``g(z_flat)``
        (:class:`CountedMap`) on a flat ``(B, D)`` state, shaped ``(B, D)``."""
        z_flat = args[-1]
        z = z_flat if self.flat else z_flat.reshape(self.shape)
        version = _version(z_flat)
        if self.calls == 0:
            out = self._first(z, lambda: self._plain(args[0], z) if self.takes_time
                              else self.inner(z))
        elif self.f is not None:
            if self.autocast is None:
                out = self.f(z, self.x)
            else:
                with torch.autocast(self.autocast[0], dtype=self.autocast[1]):
                    out = self.f(z, self.x)
                if isinstance(out, Tensor) and out.is_floating_point():
                    out = out.to(z.dtype)
        elif self.takes_time:
            out = self._plain(args[0], z)
        else:
            out = self.inner(z)
        if _version(z_flat) != version:
            _raise_modified_input(self.name)
        if not isinstance(out, Tensor) or out.shape != self.shape:
            out = self._check(out, z)
        if self.residual:
            out = out - z
        self.calls += 1
        return out if self.flat else out.reshape(self.flat_shape)

    def _function(self) -> Callable[..., Tensor]:
        raise NotImplementedError

    def _set_function(self, fn: Callable[..., Tensor]) -> None:
        raise NotImplementedError

    def _first(self, z: Tensor, call: Callable[[], Any]) -> Tensor:
        """The first evaluation, checked in full (type, shape, dtype, device)."""
        if self.bound is not None:
            return self.bound.first_call(z, self.x)  # type: ignore[arg-type]
        return check_func_output(call(), z, self.name)

    def _check(self, out: object, z: Tensor) -> Tensor:
        """A later output that is not a tensor shaped like ``z``: raise, naming the problem."""
        if self.bound is not None:
            return self.bound.check(out, z)
        return check_func_output(out, z, self.name)


class CountedODEFunc(_Counted):
    """``func(t, z)`` on flat ``(B, D)`` states: reshapes, checks and counts each call.

    ``func`` is the user's ``func(t, z)``, or a :class:`Residual` (``fx(z) - z``, ``fx``
    possibly a :class:`BoundInput`): then ``f`` is called from here directly. The first
    output is checked in full (type, shape, dtype, device); later ones for shape. ``func``
    stays the uncounted function (for Jacobian-vector products and compiled steps).
    """

    timed = True

    def __init__(self, func: Callable[[Tensor, Tensor], Tensor], z0: Tensor, name: str) -> None:
        self.func = func
        super().__init__(func, z0, name)
        self._time: tuple[float, Tensor] | None = None  # the last float time and its tensor
        self._times: dict[float, Tensor] = {}  # the times of the coming calls (prepare_times)

    def _function(self) -> Callable[..., Tensor]:
        return self.func

    def _set_function(self, fn: Callable[..., Tensor]) -> None:
        self.func = fn

    def prepare_times(self, times: Sequence[float]) -> None:
        """Make the 0-dim tensors of the times the next calls will pass as floats (a
        Runge-Kutta step's stage times) in one tensor operation instead of one per call; none
        for a :class:`Residual`, which does not use ``t``."""
        if self.residual:
            return
        values = torch.tensor(times, dtype=self.dtype, device=self.device).unbind()
        self._times = dict(zip(times, values, strict=True))

    def _time_tensor(self, t: float) -> Tensor:
        prepared = self._times.get(t)
        if prepared is not None:
            return prepared
        if self._time is None or self._time[0] != t:
            self._time = (t, torch.scalar_tensor(t, dtype=self.dtype, device=self.device))
        return self._time[1]

    def _plain(self, t: Tensor | float, z: Tensor) -> Tensor:
        """``func(t, z)`` of a function that is not a :class:`Residual` (``t`` a tensor)."""
        return self.func(t if isinstance(t, Tensor) else self._time_tensor(t), z)


class CountedMap(_Counted):
    """``g(z)`` on flat ``(B, D)`` states: reshapes, checks and counts each call (as above;
    ``g`` may be a :class:`BoundInput`, whose ``f`` is then called from here directly).
    ``g`` stays the uncounted map."""

    def __init__(self, g: Callable[[Tensor], Tensor], z0: Tensor, name: str) -> None:
        self.g = g
        super().__init__(g, z0, name)

    def _function(self) -> Callable[..., Tensor]:
        return self.g

    def _set_function(self, fn: Callable[..., Tensor]) -> None:
        self.g = fn
