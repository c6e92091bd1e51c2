"""Argument checks of the layers (numbers, the modules they call) and of the packages built on
them (class labels), with one message format."""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..solvers.validation import check_callable


def check_number(value: object, name: str, minimum: float, *, integer: bool = False,
                 strict: bool = False, finite: bool = False) -> float:
    """``value`` is a number (an ``int`` if ``integer``) ``>= minimum`` (``> minimum`` if
    ``strict``; also finite if ``finite``); returns it.

    Raises ``ValueError("<name> must be a float > 0, got ...")`` and the like otherwise.
    """
    kinds = int if integer else (int, float)
    valid = (
        not isinstance(value, bool)
        and isinstance(value, kinds)
        and (value > minimum if strict else value >= minimum)
        and (not finite or math.isfinite(value))
    )
    if not valid:
        kind = "an int" if integer else "a finite float" if finite else "a float"
        raise ValueError(f"{name} must be {kind} {'>' if strict else '>='} {minimum}, "
                         f"got {value!r}")
    return value  # type: ignore[return-value]


def check_module(value: object, name: str, contract: str) -> nn.Module:
    """``value`` is an ``nn.Module`` whose ``forward`` takes the arguments ``contract`` shows
    (``"f(z, x)"``, ``"predictor(x)"``); returns it. ``TypeError`` naming ``name`` otherwise
    (at construction, rather than Python's arity error at the first call)."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be an nn.Module called as {contract}, got "
                        f"{type(value).__name__}")
    check_callable(value.forward, name, contract)
    return value


def check_labels(y: Tensor, n: int, name: str = "y", size: str = "N") -> Tensor:
    """``y`` holds ``n`` class indices, shape ``(n,)`` (``size`` names ``n`` in the message);
    returns it. Compared with ``(n,)`` predictions, a column ``(n, 1)`` or one-hot labels would
    broadcast and count unrelated pairs: ``ValueError`` naming ``name`` and the fix."""
    if y.shape != (n,):
        raise ValueError(f"{name} must be class indices of shape ({size},) = ({n},), got "
                         f"{tuple(y.shape)} (one-hot labels: pass y.argmax(1); a column: "
                         f"y.squeeze(1))")
    return y
