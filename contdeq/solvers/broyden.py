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
    when ``g`` is constant); ``memory`` rank-one pairs are stored per sample (no dense matrix)
    and the oldest is overwritten when the memory is full. Each iteration takes the full
    quasi-Newton step ``z <- z - J^{-1} r`` and applies the Sherman-Morrison update of good
    Broyden. An update whose denominator vanishes (e.g. a sample that did not move) is skipped.

    Args:
        memory: number of rank-one updates kept.
    """

    def __init__(self, like: Tensor, *, memory: int = 30) -> None:
        self.memory = check_positive_int(memory, "memory")
        b, d = like.shape
        self.us = like.new_zeros(b, self.memory, d)
        self.vs = like.new_zeros(b, self.memory, d)
        self.count = 0
        self.prev: tuple[Tensor, Tensor] | None = None

    def _inv_jac(self, x: Tensor) -> Tensor:
        """``J^{-1} x = -x + sum_i u_i (v_i . x)`` over the stored updates."""
        n = min(self.count - 1, self.memory)
        if n <= 0:
            return -x
        us, vs = self.us[:, :n], self.vs[:, :n]
        coef = torch.bmm(vs, x.unsqueeze(2))  # (B, n, 1)
        return torch.bmm(coef.transpose(1, 2), us).squeeze(1) - x

    def _inv_jac_t(self, x: Tensor) -> Tensor:
        """``x^T J^{-1} = -x + sum_i v_i (u_i . x)`` over the stored updates."""
        n = min(self.count - 1, self.memory)
        if n <= 0:
            return -x
        us, vs = self.us[:, :n], self.vs[:, :n]
        coef = torch.bmm(us, x.unsqueeze(2))
        return torch.bmm(coef.transpose(1, 2), vs).squeeze(1) - x

    def propose(self, z: Tensor, gz: Tensor, residual: Tensor) -> Tensor:
        """Next iterate from ``z``, ``g(z)`` and ``residual = g(z) - z``."""
        if self.prev is not None:
            dz = z - self.prev[0]
            dr = residual - self.prev[1]
            v = self._inv_jac_t(dz)
            denom = (v * dr).sum(dim=1, keepdim=True)
            u = (dz - self._inv_jac(dr)) / denom
            valid = (denom.abs() > torch.finfo(z.dtype).tiny) & torch.isfinite(u).all(1, True)
            slot = (self.count - 1) % self.memory
            self.us[:, slot] = torch.where(valid, u, 0.0)
            self.vs[:, slot] = torch.where(valid, v, 0.0)
        self.prev = (z, residual)
        self.count += 1  # the update just stored is now counted by _inv_jac
        return z - self._inv_jac(residual)
