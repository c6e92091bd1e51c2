"""Anderson acceleration (type II, Walker & Ni 2011), batched with one mixing per sample."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .registry import FIXED_POINT_METHODS
from .validation import check_positive_float, check_positive_int


@FIXED_POINT_METHODS.register("anderson")
class Anderson:
    """Anderson mixing of the last ``memory`` iterates of ``g`` on flat ``(B, D)`` states.

    The mixing weights ``alpha`` of sample ``b`` minimise ``||sum_i alpha_i (g(z_i) - z_i)||``
    subject to ``sum_i alpha_i = 1``; the next iterate is
    ``damping * sum_i alpha_i g(z_i) + (1 - damping) * sum_i alpha_i z_i``.

    The Gram matrix is divided by its largest diagonal entry before the ridge term
    ``regularization * I`` is added, so the regularization is relative and the method is
    invariant to the scale of the residual (torchdeq adds an absolute ``1e-4``, which
    dominates when residuals are small, e.g. the right-hand sides of a backward solve for a
    batch-mean loss).

    Args:
        memory: number of past iterates mixed (``m``).
        damping: mixing parameter ``beta`` in ``(0, 1]``.
        regularization: relative ridge term (``>= 0``).
    """

    def __init__(
        self, like: Tensor, *, memory: int = 5, damping: float = 1.0, regularization: float = 1e-4
    ) -> None:
        self.memory = check_positive_int(memory, "memory")
        self.damping = check_positive_float(damping, "damping")
        if self.damping > 1.0:
            raise ValueError(f"damping must be in (0, 1], got {damping}")
        if isinstance(regularization, bool) or not isinstance(regularization, (int, float)) or (
            not regularization >= 0
        ):
            raise ValueError(f"regularization must be a float >= 0, got {regularization!r}")
        self.regularization = float(regularization)
        b, d = like.shape
        # Images g(z_i) and residuals g(z_i) - z_i; the iterates are their difference.
        self.gs = like.new_zeros(b, self.memory, d)
        self.rs = like.new_zeros(b, self.memory, d)
        # Views of each slot, made once: writing a slot is then one copy, not a select and a
        # copy (on small states a step costs its number of tensor operations).
        self.g_slots = self.gs.unbind(1)
        self.r_slots = self.rs.unbind(1)
        self.count = 0
        # The right-hand side of the mixing weights' system, per history length, made once.
        self.ones: dict[int, Tensor] = {}

    def reset(self) -> None:
        """Forget the stored iterates (the next step is a plain damped step)."""
        self.count = 0

    def propose(self, z: Tensor, gz: Tensor, residual: Tensor) -> Tensor:
        """Next iterate from ``z``, ``g(z)`` and ``residual = g(z) - z``."""
        slot = self.count % self.memory
        self.g_slots[slot].copy_(gz)
        self.r_slots[slot].copy_(residual)
        self.count += 1
        n = min(self.count, self.memory)
        if n == 1:
            return z.add(residual, alpha=self.damping)
        gs, rs = (self.gs, self.rs) if n == self.memory else (self.gs[:, :n], self.rs[:, :n])
        ones = self.ones.get(n)
        if ones is None:
            ones = self.ones[n] = rs.new_ones(rs.shape[0], n, 1, dtype=_working_dtype(rs))
        alpha = _mixing_weights(rs, self.regularization, slot, ones)  # (B, n, 1)
        mixed_g = _combine(alpha, gs)
        if self.damping == 1.0:
            return mixed_g
        # sum_i alpha_i z_i = sum_i alpha_i (g(z_i) - r_i)
        mixed_x = mixed_g - _combine(alpha, rs)
        return mixed_x.lerp_(mixed_g, self.damping)


#: Up to this state size a weighted sum of the stored iterates is one broadcast multiply and a
#: sum; above it, a batched matrix product. Measured on a 2-core CPU at batch 64, memory 5:
#: 11 against 44 us at 64 features, 45 against 27 us at 384.
_BROADCAST_MIX_MAX_FEATURES = 256


def _combine(alpha: Tensor, xs: Tensor) -> Tensor:
    """``sum_i alpha_i x_i`` per sample: ``alpha`` ``(B, n, 1)``, ``xs`` ``(B, n, D)`` ->
    ``(B, D)``."""
    if xs.shape[2] <= _BROADCAST_MIX_MAX_FEATURES:
        return (alpha * xs).sum(dim=1)
    return torch.bmm(alpha.transpose(1, 2), xs).squeeze(1)


def _working_dtype(residuals: Tensor) -> torch.dtype:
    """The dtype the mixing weights are computed in: float32 for half precision."""
    return torch.float32 if residuals.dtype in (torch.float16, torch.bfloat16) else (
        residuals.dtype)


def _mixing_weights(residuals: Tensor, regularization: float, newest: int, ones: Tensor
                    ) -> Tensor:
    """``(B, n, 1)`` weights minimising ``||sum_i alpha_i r_i||`` with ``sum_i alpha_i = 1``.

    ``residuals``: ``(B, n, D)`` residuals ``r_i`` of the stored iterates; ``ones``: a ``(B, n, 1)``
    tensor of ones in the working dtype (:func:`_working_dtype`). With the Gram matrix ``G``
    (scaled, plus the ridge), the weights are ``G^-1 1 / (1^T G^-1 1)``: one small batched
    solve, a handful of tensor operations in all (this runs every iteration, and on small states
    its cost is the number of operations, not their size). Half precision is worked in float32
    (its Gram matrix overflows, and ``torch.linalg.solve`` has no CPU kernel for it). A sample
    whose system is singular or non-finite (residuals near overflow) takes the plain step from
    its ``newest`` iterate instead of crashing the solve.
    """
    work = residuals.to(_working_dtype(residuals))
    gram = torch.bmm(work, work.transpose(1, 2))  # (B, n, n)
    diagonal = gram.diagonal(dim1=1, dim2=2)
    scale = diagonal.amax(dim=1, keepdim=True).clamp_min_(torch.finfo(work.dtype).tiny)
    gram.div_(scale.unsqueeze(2))
    diagonal.add_(regularization)  # a view: adds the ridge to the diagonal in place
    y, info = torch.linalg.solve_ex(gram, ones)
    alpha = y.div_(y.sum(dim=1, keepdim=True))
    # NaN/Inf propagate into the sum. With a ridge the scaled Gram matrix is positive definite,
    # so only a non-finite one can be singular: the factorization status needs no extra check.
    if not math.isfinite(alpha.sum().tolist()) or (regularization == 0 and bool(info.any())):
        failed = (info != 0) | ~torch.isfinite(alpha).all(dim=1).squeeze(1)
        plain = torch.zeros_like(alpha)
        plain[:, newest] = 1.0
        alpha = torch.where(failed[:, None, None], plain, alpha)
    return alpha.to(residuals.dtype)
