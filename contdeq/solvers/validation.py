"""The argument checks of contdeq, in one module; every message names the argument.

Public (``__all__``): the checks the layers, the implicit backward, joint inference and the
other packages share with the solvers (``all_finite``: the one-reduction finiteness test a
layer's input check also uses). The rest (the masked finiteness test, the NaN and
step-underflow errors, tolerance defaults) is internal to :mod:`contdeq.solvers`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
import types
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import ON_NONCONVERGENCE_CHOICES, NonFiniteError

if TYPE_CHECKING:
    from .callback import StepCallback

__all__ = [
    "Shapes",
    "all_finite",
    "as_shape",
    "check_bool",
    "check_callable",
    "check_callback",
    "check_choice",
    "check_func_output",
    "check_on_nonconvergence",
    "check_positive_float",
    "check_positive_int",
    "check_state",
    "check_state_shapes",
    "check_tolerances",
    "is_vmapped",
]

#: A per-sample shape for each scale of a tuple state: ``((C_1, H_1, W_1), (C_2, ...), ...)``.
Shapes = tuple[tuple[int, ...], ...]


def as_shape(value: object) -> tuple[int, ...] | None:
    """``value`` as one per-sample shape (a positive int, or a non-empty sequence of positive
    ints), or ``None`` when it is not one; callers raise with their own wording."""
    shape = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(shape, Sequence) or isinstance(shape, str) or len(shape) == 0:
        return None
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        return None
    return tuple(shape)


def check_state_shapes(shapes: object, name: str = "shapes") -> Shapes:
    """``shapes`` is a non-empty sequence of per-sample shapes (each a positive int or a
    non-empty sequence of them); returns it as a tuple of tuples."""
    valid = isinstance(shapes, Sequence) and not isinstance(shapes, str) and len(shapes) > 0
    result = [as_shape(shape) for shape in shapes] if valid else []  # type: ignore[union-attr]
    if not valid or any(shape is None for shape in result):
        raise ValueError(f"{name} must be a non-empty sequence of per-sample shapes, one per "
                         f"scale, each a tuple of positive ints (e.g. [(16, 8, 8), (32, 4, 4)]); "
                         f"got {shapes!r}")
    return tuple(result)  # type: ignore[arg-type]


def check_state(z0: object, name: str = "z0") -> Tensor:
    """``z0`` must be a finite floating-point tensor ``(B, ...)`` (batch dimension first) or
    one 1-D state; returns it."""
    if not isinstance(z0, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z0).__name__}")
    if not torch.is_floating_point(z0):
        raise TypeError(f"{name} must have a floating-point dtype, got {z0.dtype}")
    if z0.ndim == 0:
        raise ValueError(
            f"{name} must have a batch dimension first, shape (B, ...), or be one 1-D state; "
            f"got a 0-dim tensor (use {name}.reshape(1) for a single scalar state)"
        )
    if z0.shape[0] == 0 or z0.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(z0.shape)}")
    if not all_finite(z0):
        raise ValueError(f"{name} contains NaN or Inf values")
    return z0


def all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` (any shape, e.g. ``(B, ...)``) is finite; cheap when they
    are (the usual case).

    The fast path sums ``x`` (two tensor operations instead of the five of
    ``isfinite(x).all()``; NaN and Inf propagate into the sum). Only a non-finite sum, which a
    sum of large finite values can also give, pays for the exact test.
    """
    # ``detach`` is one more operation: only a tensor that records a graph needs it.
    total = (x.detach() if x.requires_grad else x).sum()
    return math.isfinite(total.tolist()) or torch.isfinite(x).all().tolist()


def is_vmapped(x: Tensor) -> bool:
    """Whether ``x`` (``(B, ...)``, any shape) is mapped by an active ``torch.func.vmap`` (at
    any transform level).

    Data-dependent checks (``bool(...)`` of a tensor) cannot run on such a tensor; the
    equilibrium layers skip their input's finiteness test there and let the batched solve
    (which sees plain tensors) test the state and ``f``'s outputs instead.
    """
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(x):
        if functorch.is_batchedtensor(x):
            return True
        x = functorch.get_unwrapped(x)
    return False


def finite_where(x: Tensor, mask: Tensor) -> bool:
    """Whether ``x`` (``(B,)``) is finite wherever ``mask`` (``(B,)`` bool) is set; the
    :func:`all_finite` fast path first."""
    return all_finite(x) or bool(torch.isfinite(x).logical_or_(~mask).all())


def check_callable(value: object, name: str, signature: str) -> None:
    """``value`` can be called as ``signature`` shows (``"func(t, z) -> dz/dt"``): it is
    callable and, where its signature can be read, takes that many positional arguments."""
    if not callable(value):
        raise TypeError(f"{name} must be callable as {signature}, got {type(value).__name__}")
    params = signature[signature.index("(") + 1:signature.index(")")].split(", ")
    # Reading a signature costs tens of microseconds, as much as a small solve's setup: the
    # verdict is kept per code object (a lambda made anew each call shares its code).
    key = _signature_key(value, len(params))
    if key is not None and key in _CALLABLE_OK:
        return
    try:
        inspect.signature(value).bind(*params)
    except ValueError:  # no readable signature (a builtin, some C extensions): call and see
        return
    except TypeError:
        takes = f"{getattr(value, '__name__', type(value).__name__)}{inspect.signature(value)}"
        hint = (f"; wrap a map of the state alone, e.g. {name}=lambda t, z: f(z)"
                if params == ["t", "z"] else "")
        count = "1 positional argument" if len(params) == 1 else (
            f"{len(params)} positional arguments")
        raise TypeError(f"{name} must be callable as {signature} ({count}: "
                        f"{', '.join(params)}), but {takes} cannot take them{hint}") from None
    if key is not None and len(_CALLABLE_OK) < _CALLABLE_CACHE_SIZE:
        _CALLABLE_OK.add(key)


#: Signatures :func:`check_callable` found to take their arguments, by :func:`_signature_key`.
_CALLABLE_OK: set[tuple[object, ...]] = set()
_CALLABLE_CACHE_SIZE = 4096


def _signature_key(value: object, n_params: int) -> tuple[object, ...] | None:
    """What decides whether ``value`` takes ``n_params`` positional arguments: a plain
    function's code and number of defaults, a bound method's function, a callable object's
    class; or ``None`` (not cached: partials, builtins, decorated functions, ...).

    A function with ``__wrapped__`` (``functools.wraps``) is not cached: its signature is the
    wrapped function's, while its code is the decorator's wrapper, shared by every function
    the decorator wraps."""
    if getattr(value, "__wrapped__", None) is not None:
        return None
    if isinstance(value, types.FunctionType):
        return (value.__code__, len(value.__defaults__ or ()), n_params)
    if isinstance(value, types.MethodType) and isinstance(value.__func__, types.FunctionType):
        func = value.__func__
        return ("method", func.__code__, len(func.__defaults__ or ()), n_params)
    call = inspect.getattr_static(type(value), "__call__", None)
    if isinstance(call, types.FunctionType) and not isinstance(value, type):
        return ("object", type(value), n_params)
    return None


def check_callback(callback: object) -> StepCallback | None:
    """``callback`` is ``None`` or callable (else ``TypeError`` naming the argument)."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be None or callable as callback(info) -> None | Stop() | "
                        f"Restart(...), got {type(callback).__name__}")
    return callback


def check_tolerances(atol: float, rtol: float, prefix: str = "") -> None:
    """Tolerances are finite, non-negative and not both zero."""
    for name, value in ((f"{prefix}atol", atol), (f"{prefix}rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if atol == 0 and rtol == 0:
        raise ValueError(f"{prefix}atol and {prefix}rtol must not both be zero")


#: The default tolerance (``atol = rtol``) of the solvers and of the implicit backward for
#: float32 and float64 states.
DEFAULT_TOLERANCE = 1e-4
#: Half-precision states get this many machine epsilons instead: a converged bf16 / fp16
#: fixed point still shows a relative residual of up to about half an epsilon (rounding of
#: ``f``'s output), so ``1e-4`` is out of reach.
HALF_PRECISION_EPSILONS = 2.0


#: Per thread: the dtype the function being solved computes in, set by
#: :func:`function_precision` (the layers' solves under ``torch.autocast``).
_PRECISION = threading.local()


@contextlib.contextmanager
def function_precision(dtype: torch.dtype) -> Iterator[None]:
    """Within the block, :func:`default_tolerance` also accounts for ``dtype``: the solver's
    state keeps its own dtype while the function being solved computes in ``dtype`` (the
    layers run their solver outside ``torch.autocast`` and only ``f`` inside it)."""
    outer = getattr(_PRECISION, "dtype", None)
    _PRECISION.dtype = dtype
    try:
        yield
    finally:
        _PRECISION.dtype = outer


def default_tolerance(dtype: torch.dtype, device_type: str = "cpu") -> float:
    """The default tolerance for a state of ``dtype`` on ``device_type``:
    ``max(1e-4, 2 * eps)`` with ``eps`` the machine epsilon of the coarsest of ``dtype``, the
    ``torch.autocast`` dtype when autocast is enabled there, and the dtype set by
    :func:`function_precision` (``f`` computes in those).

    float32 and float64: ``1e-4``; float16 (eps ``2**-10``): ``1.95e-3``; bfloat16 (eps
    ``2**-7``): ``1.56e-2``.
    """
    dtypes = [dtype, getattr(_PRECISION, "dtype", None)]
    if torch.is_autocast_enabled(device_type):
        dtypes.append(torch.get_autocast_dtype(device_type))
    eps = max(torch.finfo(d).eps for d in dtypes if d is not None)
    return max(DEFAULT_TOLERANCE, HALF_PRECISION_EPSILONS * eps)


def resolve_tolerances(atol: float | None, rtol: float | None, z: Tensor, prefix: str = ""
                       ) -> tuple[float, float]:
    """``atol`` and ``rtol`` with ``None`` replaced by :func:`default_tolerance` of the state
    ``z`` (``(B, ...)``), checked by :func:`check_tolerances`."""
    default = None if atol is not None and rtol is not None else default_tolerance(
        z.dtype, z.device.type)
    atol = default if atol is None else atol
    rtol = default if rtol is None else rtol
    check_tolerances(atol, rtol, prefix)
    return atol, rtol  # type: ignore[return-value]


def check_positive_int(value: object, name: str) -> int:
    """``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_positive_float(value: object, name: str, allow_inf: bool = False) -> float:
    """``value`` is a real number > 0 (``inf`` only when allowed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        expected = "> 0" if allow_inf else "finite and > 0"
        raise ValueError(f"{name} must be {expected}, got {value}")
    return float(value)


def check_bool(value: object, name: str) -> bool:
    """``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def check_on_nonconvergence(value: object) -> str:
    """``on_nonconvergence`` is ``"ignore"``, ``"warn"`` or ``"raise"``."""
    return check_choice(value, "on_nonconvergence", ON_NONCONVERGENCE_CHOICES)


def check_func_output(out: object, z: Tensor, name: str, state: str = "the state",
                      shape_hint: str = "", dtype_hint: str = "") -> Tensor:
    """The user's function returned a tensor ``out`` shaped like ``z`` (``(B, ...)``), with its
    dtype and device; returns it.

    ``state`` names ``z`` in the messages; the hints are appended to the shape and dtype
    messages (the layers explain there how their state shape and dtype are chosen).
    """
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must return a torch.Tensor, got {type(out).__name__}")
    if out.shape != z.shape:
        raise ValueError(
            f"{name} must return a tensor shaped like {state} {tuple(z.shape)}, "
            f"got {tuple(out.shape)}{shape_hint}"
        )
    if out.dtype != z.dtype:
        raise TypeError(f"{name} must return dtype {z.dtype} like {state}, got "
                        f"{out.dtype}{dtype_hint}")
    if out.device != z.device:
        raise ValueError(
            f"{name} must return a tensor on the state's device {z.device}, got {out.device}"
        )
    return out


def raise_nonfinite(name: str, step: int, detail: str = "") -> None:
    """Raise :class:`NonFiniteError` for a NaN/Inf that appeared at ``step``.

    Args:
        name: the user's function's name.
        step: the solver step (0: the initial state).
        detail: what exactly was found (appended to the message).
    """
    where = "at the initial state z0" if step == 0 else f"at solver step {step}"
    raise NonFiniteError(
        f"{name} produced NaN or Inf (or a state whose norm overflows) {where}"
        f"{'; ' + detail if detail else ''}; the solve was stopped", step
    )


def raise_step_underflow(name: str, step: int, t: float, h: float) -> None:
    """Raise :class:`NonFiniteError` for a step size that underflowed at pseudo-time ``t``."""
    raise NonFiniteError(
        f"the step size underflowed (h={h:.3g} at pseudo-time t={t:.6g}, solver step {step}) "
        f"after repeated rejections: {name} is not finite, or its local error never met the "
        "integrator tolerance, arbitrarily close to the last accepted state; the solve was "
        "stopped", step
    )
