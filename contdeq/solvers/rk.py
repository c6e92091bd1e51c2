"""A lean embedded Runge-Kutta stepper for steady-state solves.

torchdiffeq's stepping loop spends about 3.8 ms per dopri5 step beyond its function calls at
width 128 / batch 128 (dense-output fit, per-step tensor bookkeeping, float64 time tensors).
Reaching a steady state needs none of that: no interpolant, no output grid. This stepper forms
each stage input as one fresh tensor updated in place (``y + h * sum_j beta_ij k_j``, skipping
zero coefficients). That measured faster on CPU than a single ``addmm`` over a stage buffer
(a 1-row GEMV plus a copy per stage), and it is autograd-safe, so backpropagation through the
steps works with the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .tableaux import Tableau
from .termination import sample_rms

#: Dtypes whose step-size control is computed in float32.
_HALF = (torch.float16, torch.bfloat16)


def _combine(
    base: Tensor | None, scale: float, coefs: Sequence[float], ks: Sequence[Tensor]
) -> Tensor:
    """``base + scale * sum_j coefs[j] * ks[j]`` as one new tensor (``base=None``: no base)."""
    out = None
    for c, k in zip(coefs, ks, strict=False):
        if c == 0.0:
            continue
        if out is None:
            out = k * (scale * c) if base is None else torch.add(base, k, alpha=scale * c)
        else:
            out.add_(k, alpha=scale * c)
    if out is None:
        return torch.zeros_like(ks[0]) if base is None else base.clone()
    return out


class RungeKuttaStepper:
    """Takes trial steps of an embedded pair on flat ``(B, D)`` states."""

    def __init__(self, tableau: Tableau) -> None:
        self.tableau = tableau
        #: ``(B, D)`` the last evaluation of ``func`` in :meth:`step`, before masking: at the
        #: new state, the derivative of every sample (frozen ones included).
        self.last_evaluation: Tensor | None = None

    def step(
        self,
        func: Callable[[float, Tensor], Tensor],
        t: float,
        y0: Tensor,
        f0: Tensor,
        h: float,
        mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One trial step from ``(t, y0)`` with ``f0 = func(t, y0)``.

        Args:
            func: the counted right-hand side on flat states.
            t: time at the start of the step.
            y0: ``(B, D)`` state.
            f0: ``(B, D)`` derivative at ``y0`` (already masked).
            h: step size.
            mask: ``(B, 1)`` 1 for samples still moving, 0 for frozen ones (``None``: all move).

        Returns:
            ``(y1, f1, error)``: the new state, its (masked) derivative, and the local error
            estimate, each ``(B, D)``. Frozen samples have ``y1 = y0`` and zero ``f1``/``error``.
        """
        tab = self.tableau  # the stage times are those of stage_times(tab, t, h)
        ks = [f0]
        yi = y0
        for alpha_i, beta_i in zip(tab.alpha, tab.beta, strict=True):
            yi = _combine(y0, h, beta_i, ks)
            fi = func(t + alpha_i * h, yi)
            ks.append(fi if mask is None else fi * mask)
            self.last_evaluation = fi
        if tab.fsal:
            y1, f1 = yi, ks[-1]
        else:
            y1 = _combine(y0, h, tab.c_sol, ks)
            f1 = self.last_evaluation = func(t + h, y1)
            f1 = f1 if mask is None else f1 * mask
        error = _combine(None, h, tab.c_error, ks)
        return y1, f1, error


def stage_times(tableau: Tableau, t: float, h: float) -> list[float]:
    """The times at which :meth:`RungeKuttaStepper.step` from ``t`` with step ``h`` evaluates
    the function, computed as it computes them."""
    times = [t + alpha_i * h for alpha_i in tableau.alpha]
    return times if tableau.fsal else [*times, t + h]


def error_ratio(error: Tensor, y0: Tensor, y1: Tensor, atol: float, rtol: float) -> float:
    """Largest per-sample RMS of ``error / (atol + rtol * max(|y0|, |y1|))``.

    NaN when a stage or the error estimate is NaN/Inf (the caller rejects the step), possibly
    ``inf`` when the ratio overflows. Taking the maximum over samples (rather than an RMS over
    the whole batch) keeps the step control strict as samples freeze: frozen samples have zero
    error and would otherwise dilute the norm.
    """
    return ratio_of_norm(error_norm(error, y0, y1, atol, rtol).tolist(), error.shape[1])


def ratio_of_norm(norm: float, width: int) -> float:
    """:func:`error_ratio` from :func:`error_norm`'s value, read by the caller: the RMS over the
    ``width`` entries of a sample."""
    return norm / (width ** 0.5)


def error_norm(error: Tensor, y0: Tensor, y1: Tensor, atol: float, rtol: float) -> Tensor:
    """:func:`error_ratio` times ``sqrt(D)``, as a 0-dim tensor (float32 for half precision,
    else ``error``'s dtype), for a loop that reads it with its other values of the step."""
    with torch.no_grad():
        if error.dtype in _HALF:  # atol / error would underflow / overflow in half precision
            error, y0, y1 = error.float(), y0.float(), y1.float()
        # atol = 0 (a relative test): the smallest normal number keeps exact zeros from 0 / 0.
        floor = atol if atol > 0 else torch.finfo(error.dtype).tiny
        scale = torch.maximum(y0.abs(), y1.abs()).mul_(rtol).add_(floor)
        return torch.linalg.vector_norm(error / scale, dim=1).max()


def next_step_size(
    h: float, ratio: float, order: int, safety: float = 0.9, ifactor: float = 10.0,
    dfactor: float = 0.2,
) -> float:
    """Elementary controller: ``h * clamp(safety * ratio^(-1/order), dfactor, ifactor)``."""
    if ratio == 0.0:
        return h * ifactor
    return h * min(ifactor, max(dfactor, safety * ratio ** (-1.0 / order)))


def initial_step(
    f0: Tensor, z0: Tensor, atol: float, rtol: float, order: int, cap: float = 1.0
) -> float:
    """First step from the problem, at no extra function evaluation: ``f0`` is the derivative
    ``(B, ...)`` at the state ``z0`` (shaped like ``f0``); returns a float.

    ``h0 = min(cap, 0.5 * (1 / max_b(||f0_b|| / (atol + rtol * ||z0_b||)))^(1/order))``.
    For ``dz/dt = f(z) - z`` the solution relaxes on a time scale of 1, so the local error of a
    step ``h`` scales like ``||f0|| h^order``; the rule asks for an error ratio near 1 and caps
    the step at that time scale. torchdiffeq's rule (Hairer's) spends one more evaluation and,
    with ``z0 = 0``, starts from about ``1e-4`` (``docs/check_numbers.py`` measures it).

    With ``atol = 0`` a sample at ``z0_b = 0`` has no scale of its own; the state after the
    step, about ``h f0_b``, gives it: ``||f0_b|| / scale_b`` becomes ``1 / rtol``.
    """
    with torch.no_grad():
        if f0.dtype in _HALF:
            f0, z0 = f0.float(), z0.float()
        f_norm = sample_rms(f0)
        scale = sample_rms(z0, rtol).add_(atol)
        scale = torch.where(scale > 0, scale, f_norm * rtol)
        # 0 / 0 (f0_b = 0, at rest) counts as 0; an overflowed ratio as the dtype's largest
        # value (a tiny first step; f0 itself is finite, Progress refused it otherwise).
        d = float((f_norm / scale).nan_to_num_(nan=0.0).max())
    if d == 0.0:
        return cap
    return min(cap, 0.5 * d ** (-1.0 / order))
