"""Picard (fixed-point) iteration with damping: ``z <- (1 - damping) z + damping g(z)``."""

from __future__ import annotations

from torch import Tensor

from .registry import FIXED_POINT_METHODS
from .validation import check_positive_float


@FIXED_POINT_METHODS.register("picard")
class Picard:
    """Damped Picard iteration on flat ``(B, D)`` states.

    Args:
        damping: step length in ``(0, 1]``; ``1`` is plain iteration ``z <- g(z)``.
    """

    differentiable = True  # plain out-of-place arithmetic

    def __init__(self, like: Tensor, *, damping: float = 1.0) -> None:
        self.damping = check_positive_float(damping, "damping")
        if self.damping > 1.0:
            raise ValueError(f"damping must be in (0, 1], got {damping}")

    def reset(self) -> None:
        """Nothing to forget (no history)."""

    def propose(self, z: Tensor, gz: Tensor, residual: Tensor) -> Tensor:
        """Next iterate from ``z``, ``g(z)`` and ``residual = g(z) - z``."""
        if self.damping == 1.0:
            return gz
        return z.add(residual, alpha=self.damping)
