"""The steady-state condition, judged per sample along the batch dimension.

A sample ``b`` has converged when ``||r_b|| <= atol + rtol * ||z_b||``, where ``r`` is the
residual (``dz/dt`` for an ODE, ``g(z) - z`` for a fixed-point map) and ``||.||`` is the
root-mean-square over every dimension but the first. The RMS norm does not grow with the
width of the state, so one tolerance means the same thing for a 64- and a 4096-wide layer
(an unnormalised L2 norm, as torchdeq uses, gets stricter as the state grows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def sample_rms(x: Tensor, factor: float = 1.0) -> Tensor:
    """Root-mean-square of each sample, times ``factor``: ``(B, ...) -> (B,)``, in ``x``'s dtype.

    States of less than double precision are accumulated in float64: a float32 sum of squares
    overflows for entries above about ``1e19`` (a finite state reported as non-finite) and
    underflows below about ``1e-19`` (a residual of 0 judged converged against a tolerance of 0).
    float64 states are exact from about ``1e-154`` to ``1e154`` per entry.
    """
    flat = x if x.ndim == 2 else x.reshape(x.shape[0], -1)
    scale = factor / flat.shape[1] ** 0.5
    if flat.dtype == torch.float64:
        return torch.linalg.vector_norm(flat, dim=1) * scale
    # Out of place: the norm's backward reads its output (an unrolled solve differentiates
    # through the residual norms of its step control).
    rms = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64) * scale
    return rms.to(flat.dtype)


@dataclass(frozen=True)
class SteadyStateCondition:
    """``||r_b|| <= atol + rtol * ||z_b||`` for each sample ``b`` (RMS norms)."""

    atol: float
    rtol: float

    def tolerance(self, z: Tensor) -> Tensor:
        """``(B,)`` tolerance of each sample at state ``z``."""
        if self.rtol == 0.0:
            return torch.full((z.shape[0],), self.atol, dtype=z.dtype, device=z.device)
        tol = sample_rms(z, self.rtol)
        return tol if self.atol == 0.0 else tol.add_(self.atol)  # in place: called every step

    def evaluate(self, z: Tensor, residual: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(residual_norm, tolerance, converged)``, each ``(B,)``."""
        res = sample_rms(residual)
        tol = self.tolerance(z)
        return res, tol, res <= tol
