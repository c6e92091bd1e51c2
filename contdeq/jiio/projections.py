"""Projections onto the constraint sets of input optimization: L∞ and L2 balls, boxes.

Each helper returns a callable ``project(x) -> x`` on ``(B, ...)`` tensors, for
:func:`~contdeq.jiio.joint_inference` and :func:`~contdeq.jiio.nested_inference`;
:func:`compose` chains them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..solvers.validation import check_positive_float

__all__ = ["Projection", "box", "compose", "l2_ball", "linf_ball"]

#: A projection: ``(B, ...)`` -> ``(B, ...)``, the same shape, dtype and device.
Projection = Callable[[Tensor], Tensor]


def _radius(eps: float | Tensor, center: Tensor) -> Tensor:
    """``eps`` as a ``(B, 1, ..., 1)`` tensor broadcasting against ``center`` ``(B, ...)``."""
    if isinstance(eps, Tensor):
        if eps.shape not in ((), (center.shape[0],)) or not bool((eps > 0).all()):
            smallest = f", smallest value {float(eps.min()):g}" if eps.numel() else ""
            raise ValueError(f"eps must be a float > 0 or a (B,) = ({center.shape[0]},) tensor "
                             f"of them, got shape {tuple(eps.shape)}{smallest}")
        eps = eps.to(center)
    else:
        eps = torch.tensor(check_positive_float(eps, "eps"), dtype=center.dtype,
                           device=center.device)
    return eps.reshape(-1, *([1] * (center.ndim - 1)))


def _check_center(center: object) -> Tensor:
    if not isinstance(center, Tensor) or not torch.is_floating_point(center) or center.ndim < 1:
        raise TypeError("center must be a floating-point (B, ...) tensor, got "
                        f"{type(center).__name__}")
    return center.detach()


def _check_like(x: Tensor, center: Tensor, name: str) -> None:
    if x.shape != center.shape:
        raise ValueError(f"{name}: x must have the center's shape {tuple(center.shape)}, got "
                         f"{tuple(x.shape)}")


def linf_ball(center: Tensor, eps: float | Tensor) -> Projection:
    """Projection onto ``{x : max_i |x_i - center_i| <= eps}``, per sample.

    Args:
        center: ``(B, ...)`` the reference input (e.g. the clean image).
        eps: radius, a float or a ``(B,)`` tensor (one per sample).

    Returns:
        ``project(x)``, ``x`` ``(B, ...)`` shaped like ``center``.
    """
    center = _check_center(center)
    radius = _radius(eps, center)

    def project(x: Tensor) -> Tensor:
        _check_like(x, center, "linf_ball")
        return center + torch.maximum(torch.minimum(x - center, radius), -radius)

    return project


def l2_ball(center: Tensor, eps: float | Tensor) -> Projection:
    """Projection onto ``{x : ||x - center||_2 <= eps}``, per sample (Euclidean norm over all
    dimensions but the first).

    Args:
        center: ``(B, ...)`` the reference input.
        eps: radius, a float or a ``(B,)`` tensor.

    Returns:
        ``project(x)``, ``x`` ``(B, ...)`` shaped like ``center``.
    """
    center = _check_center(center)
    radius = _radius(eps, center)

    def project(x: Tensor) -> Tensor:
        _check_like(x, center, "l2_ball")
        delta = x - center
        norm = torch.linalg.vector_norm(delta.reshape(delta.shape[0], -1), dim=1)
        scale = (radius.reshape(-1) / norm.clamp_min(torch.finfo(x.dtype).tiny)).clamp(max=1.0)
        return center + delta * scale.reshape(-1, *([1] * (x.ndim - 1)))

    return project


def box(lo: float | Tensor, hi: float | Tensor) -> Projection:
    """Projection onto the box ``lo <= x <= hi`` (elementwise clamp).

    Args:
        lo, hi: bounds, floats or tensors broadcasting against ``x`` ``(B, ...)``; ``lo < hi``.

    Returns:
        ``project(x)``, ``(B, ...)`` -> ``(B, ...)``.
    """
    if not bool(torch.all(torch.as_tensor(lo) < torch.as_tensor(hi))):
        raise ValueError(f"box: lo must be < hi everywhere, got lo={lo!r}, hi={hi!r}")

    def project(x: Tensor) -> Tensor:
        return torch.clamp(x, min=torch.as_tensor(lo, dtype=x.dtype, device=x.device),
                           max=torch.as_tensor(hi, dtype=x.dtype, device=x.device))

    return project


def compose(*projections: Projection) -> Projection:
    """Apply ``projections`` in order: ``compose(p, q)(x) = q(p(x))``.

    For an L∞ ball and a box (both boxes) this is the exact projection onto their
    intersection; for an L2 ball and a box it is a feasible point of the box, not in general
    the nearest point of the intersection.

    Args:
        *projections: callables ``(B, ...) -> (B, ...)``.

    Returns:
        ``project(x)``, ``(B, ...)`` -> ``(B, ...)``.
    """
    if not projections or not all(callable(p) for p in projections):
        raise TypeError("compose needs one or more callables project(x) -> x")

    def project(x: Tensor) -> Tensor:
        for p in projections:
            x = p(x)
        return x

    return project
