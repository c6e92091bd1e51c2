"""Limited-memory ("good") Broyden's method on the residual ``r(z) = g(z) - z``."""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import FIXED_POINT_METHODS
from .validation import check_positive_int


@FIXED_POINT_METHODS.register("broyden")
class Broyden:
    """Quasi-Newton iteration with a low-rank inverse Jacobian, on flat ``(B, D)`` states.

    The inverse Jacobian of ``r`` is approximated by ``-I + sum_i u_i v_i^T`` (``-I`` is exact
    when ``g`` is constant); up to ``memory`` rank-one pairs are stored per sample (no dense
    matrix). Each iteration takes the full quasi-Newton step ``z <- z - J^{-1} r`` and applies
    the Sherman-Morrison update of good Broyden. When the memory is full the pairs are dropped
    and the approximation restarts from ``-I`` (limited-memory restart): each pair was computed
    from the inverse that all earlier pairs define, so overwriting the oldest one alone leaves
    an inconsistent inverse, which made the iterate diverge on contractive maps. An update whose
    denominator is negligible against its factors' norms (e.g. a sample that did not move), or
    that is not finite, is skipped.

    Args:
        memory: number of rank-one updates kept before a restart.

    The low-rank products are broadcast multiplies and sums rather than ``torch.bmm``, whose
    float64 BLAS threads stall each other on a loaded CPU (see :mod:`.gmres`).
    """

    def __init__(self, like: Tensor, *, memory: int = 30) -> None:
        self.memory = check_positive_int(memory, "memory")
        b, d = like.shape
        self.us = like.new_zeros(b, self.memory, d)
        self.vs = like.new_zeros(b, self.memory, d)
        self.stored = 0
        self.prev: tuple[Tensor, Tensor] | None = None

    def _inv_jac(self, x: Tensor) -> Tensor:
        """``J^{-1} x = -x + sum_i u_i (v_i . x)`` over the stored updates."""
        if self.stored == 0:
            return -x
        us, vs = self.us[:, : self.stored], self.vs[:, : self.stored]
        coef = (vs * x.unsqueeze(1)).sum(2, keepdim=True)  # (B, n, 1)
        return (coef * us).sum(1) - x

    def _inv_jac_t(self, x: Tensor) -> Tensor:
        """``x^T J^{-1} = -x + sum_i v_i (u_i . x)`` over the stored updates."""
        if self.stored == 0:
            return -x
        us, vs = self.us[:, : self.stored], self.vs[:, : self.stored]
        coef = (us * x.unsqueeze(1)).sum(2, keepdim=True)
        return (coef * vs).sum(1) - x

    def reset(self) -> None:
        """Forget the rank-one updates: the inverse Jacobian restarts from ``-I``."""
        self.stored = 0
        self.prev = None

    def propose(self, z: Tensor, gz: Tensor, residual: Tensor) -> Tensor:
        """Next iterate from ``z``, ``g(z)`` and ``residual = g(z) - z``."""
        if self.prev is not None:
            if self.stored == self.memory:  # full: restart from -I (see the class docstring)
                self.us.zero_()
                self.vs.zero_()
                self.stored = 0
            dz = z - self.prev[0]
            dr = residual - self.prev[1]
            v = self._inv_jac_t(dz)
            denom = (v * dr).sum(dim=1, keepdim=True)
            u = (dz - self._inv_jac(dr)) / denom
            scale = torch.linalg.vector_norm(v, dim=1, keepdim=True) * torch.linalg.vector_norm(
                dr, dim=1, keepdim=True)
            valid = (denom.abs() > torch.finfo(z.dtype).eps * scale) & torch.isfinite(u).all(
                1, True)
            self.us[:, self.stored] = torch.where(valid, u, 0.0)
            self.vs[:, self.stored] = torch.where(valid, v, 0.0)
            self.stored += 1
        self.prev = (z, residual)
        return z - self._inv_jac(residual)
