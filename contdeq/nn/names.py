"""Keyword spellings renamed for one word per concept (tolerances ``atol``/``rtol``, limits
``max_steps``): the old spelling keeps working for one release with a ``DeprecationWarning``
that names the new one, attributed to the user's line."""

from __future__ import annotations

from typing import Any

from .._warnings import warn

__all__ = ["RENAMED", "renamed"]

#: ``(where, old keyword) -> new keyword`` of every renamed layer keyword.
RENAMED = {
    ("DEQ", "backward_tol"): "backward_rtol",
    ("NeuralODE", "max_num_steps"): "max_steps",
}


def renamed(where: str, old: str, old_value: Any, new: str, new_value: Any,
            new_default: Any = None) -> Any:
    """The value of keyword ``new`` of ``where``, accepting the deprecated spelling ``old``.

    ``old_value`` is what the caller passed as ``old`` (``None``: not passed), ``new_value``
    what it passed as ``new`` (``new_default``: not passed). Passing ``old`` warns
    (``DeprecationWarning`` naming ``new``); passing both raises ``TypeError``.
    """
    if old_value is None:
        return new_value
    if new_value != new_default:
        raise TypeError(f"{where}: pass {new}=... only ({old} is its deprecated spelling)")
    warn(f"{where}({old}=...) is deprecated and will be removed in the next release: use "
         f"{new}=... (one word per concept: tolerances atol/rtol, limits max_steps)",
         DeprecationWarning)
    return old_value
