"""Warnings attributed to the user's line: the first frame outside contdeq and torch.

A fixed ``stacklevel`` points at library code as soon as the warning is raised from a
different depth (a layer's forward, its backward, ``steady_state`` called directly);
``warnings.warn(..., skip_file_prefixes=...)`` needs Python 3.12. :func:`warn` walks the
stack instead, past contdeq's own frames and torch's (``nn.Module.__call__``, the autograd
engine's Python entry points), so ``warning.filename`` is the file of the line that called
into contdeq: ``model(x)``, ``loss.backward()`` or ``steady_state(...)``. :func:`renamed`
accepts a keyword's deprecated spelling with such a warning.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch

__all__ = ["renamed", "user_stacklevel", "warn"]

_SKIPPED = tuple(
    os.path.dirname(os.path.abspath(module.__file__)) + os.sep
    for module in (sys.modules[__package__], torch)
    if module.__file__ is not None
)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes ``warnings.warn``, called by the caller of this
    function, name the first frame outside contdeq and torch (the outermost frame when every
    frame is inside them)."""
    frame = sys._getframe(1)  # the frame that will call warnings.warn: stacklevel 1
    level = 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            _SKIPPED):
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the user's line."""
    warnings.warn(message, category, stacklevel=user_stacklevel())


def renamed(where: str, old: str, old_value: Any, new: str, new_value: Any,
            new_default: Any = None) -> Any:
    """The value of keyword ``new`` of ``where``, accepting the deprecated spelling ``old``.

    ``old_value`` is what the caller passed as ``old`` (``None``: not passed), ``new_value``
    what it passed as ``new`` (``new_default``: not passed). Passing ``old`` warns
    (``DeprecationWarning`` naming ``new``, at the user's line); passing both raises
    ``TypeError``.
    """
    if old_value is None:
        return new_value
    if new_value != new_default:
        raise TypeError(f"{where}: pass {new}=... only ({old} is its deprecated spelling)")
    warn(f"{where}({old}=...) is deprecated and will be removed in the next release: use "
         f"{new}=... (one word per concept: tolerances atol/rtol, limits max_steps)",
         DeprecationWarning)
    return old_value
