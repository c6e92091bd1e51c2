"""Checks of the layers' numeric constructor arguments, with one message format."""

from __future__ import annotations

import math


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
