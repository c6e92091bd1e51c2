"""Anderson acceleration (type II, Walker & Ni 2011), batched with one mixing per sample."""

from __future__ import annotations

import torch
from torch import Tensor

from .validation import check_positive_float, check_positive_int


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
        self.xs = like.new_zeros(b, self.memory, d)
        self.gs = like.new_zeros(b, self.memory, d)
        self.count = 0

    def propose(self, z: Tensor, gz: Tensor, residual: Tensor) -> Tensor:
        """Next iterate from ``z``, ``g(z)`` and ``residual = g(z) - z``."""
        slot = self.count % self.memory
        self.xs[:, slot] = z
        self.gs[:, slot] = gz
        self.count += 1
        n = min(self.count, self.memory)
        if n == 1:
            return z.add(residual, alpha=self.damping)
        xs, gs = self.xs[:, :n], self.gs[:, :n]
        alpha = _mixing_weights(gs - xs, self.regularization, slot)  # (B, n, 1)
        mixed_g = torch.bmm(alpha.transpose(1, 2), gs).squeeze(1)
        if self.damping == 1.0:
            return mixed_g
        mixed_x = torch.bmm(alpha.transpose(1, 2), xs).squeeze(1)
        return mixed_x.lerp_(mixed_g, self.damping)


def _mixing_weights(diffs: Tensor, regularization: float, newest: int) -> Tensor:
    """``(B, n, 1)`` weights minimising ``||sum_i alpha_i diffs_i||`` with ``sum_i alpha_i = 1``.

    ``diffs``: ``(B, n, D)`` residuals of the stored iterates. Half precision is worked in
    float32 (its Gram matrix overflows, and ``torch.linalg.solve`` has no CPU kernel for it). A
    sample whose system is singular or non-finite (residuals near overflow) takes the plain
    step from its ``newest`` iterate instead of crashing the solve.
    """
    work = diffs.float() if diffs.dtype in (torch.float16, torch.bfloat16) else diffs
    b, n, _ = work.shape
    gram = torch.bmm(work, work.transpose(1, 2))  # (B, n, n)
    scale = gram.diagonal(dim1=1, dim2=2).amax(dim=1).clamp_min(torch.finfo(work.dtype).tiny)
    eye = torch.eye(n, dtype=work.dtype, device=work.device)
    gram = gram / scale[:, None, None] + regularization * eye
    # Bordered system [[0, 1^T], [1, G]] [nu; alpha] = [1; 0].
    system = work.new_zeros(b, n + 1, n + 1)
    system[:, 0, 1:] = 1.0
    system[:, 1:, 0] = 1.0
    system[:, 1:, 1:] = gram
    rhs = work.new_zeros(b, n + 1, 1)
    rhs[:, 0] = 1.0
    solution, info = torch.linalg.solve_ex(system, rhs)
    alpha = solution[:, 1:]
    failed = (info != 0) | ~torch.isfinite(alpha).all(dim=1).squeeze(1)
    plain = torch.zeros_like(alpha)
    plain[:, newest] = 1.0
    return torch.where(failed[:, None, None], plain, alpha).to(diffs.dtype)
