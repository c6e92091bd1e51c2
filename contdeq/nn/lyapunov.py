"""Lyapunov-stable equilibrium layers: :class:`LyapunovDEQ` and its parts.

LyaDEQ (Chu, Wei, Liu & Zhao, "Lyapunov-Stable Deep Equilibrium Models", AAAI 2024) reads a
DEQ as the dynamical system ``dz/dt = f(z, x) - z`` and makes it Lyapunov stable with the
stable-dynamics projection of Kolter & Manek ("Learning Stable Deep Dynamics Models",
NeurIPS 2019): with a learned convex, positive definite ``V``, the nominal vector field
``r = f(z, x) - z`` is replaced by::

    r_V = r - grad V(z) * relu(grad V(z)^T r + alpha * V(z)) / ||grad V(z)||^2

so that ``dV/dt = grad V^T r_V <= -alpha * V`` along every trajectory. An orthogonal linear
layer after the equilibrium keeps the equilibria of different inputs apart (LyaDEQ's answer
to stable equilibria that crowd together). See ``docs/robustness.md`` for the construction and
where this implementation differs from the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from .checks import check_number
from .deq import DEQ, check_state

__all__ = ["ICNN", "ICNN_ACTIVATIONS", "LyapunovDEQ", "LyapunovDynamics", "LyapunovFunction"]

#: Activations of :class:`ICNN`: convex and non-decreasing (what keeps the network convex)
#: and smooth (``V``'s gradient drives the dynamics).
ICNN_ACTIVATIONS = ("softplus", "smooth_relu")
#: Rates ``grad V^T r + alpha V`` below this many machine epsilons of their terms' magnitude
#: count as zero (rounding noise at equilibria of the nominal field).
_ROUNDING = 64


def smooth_relu(t: Tensor, width: float = 0.1) -> Tensor:
    """Kolter & Manek's smoothed ReLU: ``0`` for ``t <= 0``, ``t^2 / (2 width)`` on
    ``(0, width)``, ``t - width / 2`` above; convex, non-decreasing, ``C^1``, zero at zero."""
    zero = torch.zeros_like(t)
    quadratic = t.clamp(0, width) ** 2 / (2 * width)
    return torch.where(t <= 0, zero, torch.where(t < width, quadratic, t - width / 2))


class _NonNegative(nn.Module):
    """Parametrization ``W = softplus(raw)``: the weight stays elementwise non-negative."""

    def forward(self, raw: Tensor) -> Tensor:
        return F.softplus(raw)

    def right_inverse(self, weight: Tensor) -> Tensor:
        if bool((weight < 0).any()):
            raise ValueError("an ICNN hidden-to-hidden weight must be non-negative for the "
                             "network to stay convex; got negative entries")
        return torch.log(torch.expm1(weight.clamp_min(1e-6)))


class ICNN(nn.Module):
    """Input-convex neural network ``g: (B, D) -> (B,)`` (Amos, Xu & Kolter 2017).

    ``h_1 = act(W_0 z + b_0)``, ``h_{k+1} = act(U_k h_k + W_k z + b_k)``,
    ``g(z) = u^T h_K + w^T z + c``. ``g`` is convex in ``z`` because the ``U_k`` and ``u`` are
    non-negative (a ``softplus`` parametrization enforces it; assigning a negative value
    raises) and ``act`` is convex and non-decreasing.

    Args:
        dim: input size ``D``.
        hidden: hidden widths (at least one).
        activation: ``"softplus"`` (default) or ``"smooth_relu"``; anything else, which need
            not be convex and non-decreasing, is refused.

    Shapes: ``z`` ``(B, D)`` -> ``(B,)``.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64), *,
                 activation: str = "softplus") -> None:
        super().__init__()
        check_number(dim, "dim", 1, integer=True)
        hidden = tuple(hidden)
        if not hidden:
            raise ValueError("hidden must list at least one width, got ()")
        for width in hidden:
            check_number(width, "hidden width", 1, integer=True)
        if activation not in ICNN_ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {ICNN_ACTIVATIONS} (convex and non-decreasing, so "
                f"that the ICNN is convex), got {activation!r}")
        self.activation = activation
        self.inputs = nn.ModuleList(nn.Linear(dim, w) for w in (*hidden, 1))
        self.hidden = nn.ModuleList(
            nn.Linear(a, b, bias=False) for a, b in zip(hidden, (*hidden[1:], 1), strict=True))
        for layer in self.hidden:
            with torch.no_grad():
                layer.weight.abs_().mul_(0.5)
            parametrize.register_parametrization(layer, "weight", _NonNegative())

    def _act(self, t: Tensor) -> Tensor:
        return F.softplus(t) if self.activation == "softplus" else smooth_relu(t)

    def forward(self, z: Tensor) -> Tensor:
        """``z`` ``(B, D)`` -> ``g(z)`` ``(B,)``."""
        h = self._act(self.inputs[0](z))
        for k, (direct, hidden) in enumerate(zip(self.inputs[1:], self.hidden, strict=True)):
            out = direct(z) + hidden(h)
            h = out if k == len(self.hidden) - 1 else self._act(out)
        return h.squeeze(-1)


class LyapunovFunction(nn.Module):
    """Convex positive definite ``V(z) = smooth_relu(g(z) - g(0)) + eps * ||z||^2``.

    ``g`` is an :class:`ICNN`; ``V(0) = 0``, ``V(z) > 0`` elsewhere, ``V`` is strictly convex
    (so ``grad V`` vanishes only at ``0``) and ``C^1`` (Kolter & Manek 2019, eq. 14).

    Args:
        dim: state size ``D``.
        hidden: hidden widths of the ICNN.
        eps: weight of the quadratic term (> 0: what makes ``V`` positive definite).
        activation: the ICNN's activation (see :class:`ICNN`).
        smoothing: width of the smoothed ReLU (> 0).

    Shapes: ``z`` ``(B, D)`` -> ``(B,)``.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64), *, eps: float = 1e-2,
                 activation: str = "softplus", smoothing: float = 0.1) -> None:
        super().__init__()
        check_number(eps, "eps", 0, strict=True, finite=True)
        check_number(smoothing, "smoothing", 0, strict=True, finite=True)
        self.icnn = ICNN(dim, hidden, activation=activation)
        self.eps = float(eps)
        self.smoothing = float(smoothing)

    def forward(self, z: Tensor) -> Tensor:
        """``z`` ``(B, D)`` -> ``V(z)`` ``(B,)``."""
        g0 = self.icnn(torch.zeros_like(z[:1]))
        return smooth_relu(self.icnn(z) - g0, self.smoothing) + self.eps * (z * z).sum(dim=1)


class LyapunovDynamics(nn.Module):
    """The projected map ``f_V(z, x) = z + r_V`` whose residual ``f_V - z`` is ``r_V`` above.

    Any solver of a :class:`~contdeq.DEQ` can use it in place of ``f``: its equilibria are
    those of the projected field. ``grad V`` comes from autograd (with ``create_graph`` when
    gradients are being recorded, so the layer's backward differentiates through it); where
    ``grad V = 0`` (only at ``z = 0``) the correction is zero.

    Args:
        f: the nominal ``f(z, x)``, ``(B, D)`` states.
        lyapunov: ``V``, ``(B, D) -> (B,)``.
        alpha: decay rate (>= 0): ``dV/dt <= -alpha V``. ``0`` (default) keeps ``V``
            non-increasing (Lyapunov stability); ``alpha > 0`` makes ``0`` the only
            equilibrium (exponential stability), so every input's trajectory ends there.

    Shapes: ``z`` ``(B, D)``, ``x`` ``(B, ...)`` -> ``(B, D)``.
    """

    def __init__(self, f: nn.Module, lyapunov: nn.Module, alpha: float = 0.0) -> None:
        super().__init__()
        check_number(alpha, "alpha", 0, finite=True)
        self.f = f
        self.lyapunov = lyapunov
        self.alpha = float(alpha)

    def value_and_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(V(z), grad V(z))``, ``(B,)`` and ``(B, D)``; differentiable when grad is on."""
        record = torch.is_grad_enabled()
        with torch.enable_grad():
            zg = z if z.requires_grad else z.detach().requires_grad_(True)
            v = self.lyapunov(zg)
            (grad,) = torch.autograd.grad(v.sum(), zg, create_graph=record)
        if not record:
            v = v.detach()
        return v, grad

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        """``z`` ``(B, D)``, ``x`` ``(B, ...)`` -> ``z + r_V(z, x)`` ``(B, D)``."""
        r = self.f(z, x) - z
        v, grad = self.value_and_grad(z)
        rate = (grad * r).sum(dim=1) + self.alpha * v
        # At an equilibrium of the nominal field the rate is exactly zero in exact arithmetic;
        # its rounding error must not switch the projection (and the Jacobian) on.
        scale = (grad * r).abs().sum(dim=1) + self.alpha * v
        active = rate > _ROUNDING * torch.finfo(z.dtype).eps * scale
        excess = torch.where(active, rate, torch.zeros_like(rate))
        norm2 = (grad * grad).sum(dim=1).clamp_min(torch.finfo(z.dtype).tiny)
        return z + r - grad * (excess / norm2).unsqueeze(1)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"


class LyapunovDEQ(DEQ):
    """Lyapunov-stable DEQ (LyaDEQ): the equilibrium of the projected field ``r_V``, started
    from the input features, followed by an orthogonal linear layer.

    The trajectory starts at ``z0 = x`` (LyaDEQ solves from the feature extractor's output, so
    an input perturbation is a perturbation of the initial state, which Lyapunov stability
    controls: ``V(z(t)) <= V(z0)`` along the flow). ``f(z, x)`` still sees ``x`` as input
    injection. The layer is a :class:`~contdeq.DEQ` whose ``f`` is :class:`LyapunovDynamics`
    (``layer.f``; the user's map is ``layer.f.f``, ``V`` is ``layer.lyapunov``), so every
    solver and backward mode works as for the other layers.

    Args:
        f: ``f(z, x)`` on ``(B, dim)`` states.
        dim: state size ``D`` (``x`` must be ``(B, D)`` unless ``z0`` is given).
        hidden: hidden widths of ``V``'s ICNN.
        alpha: decay rate of ``V`` (default 0; see :class:`LyapunovDynamics`).
        eps: quadratic weight of ``V`` (> 0).
        activation: the ICNN's activation, ``"softplus"`` or ``"smooth_relu"``.
        out_features: outputs of the orthogonal layer (default ``D``).
        **kwargs: the options of :class:`~contdeq.DEQ` (``solver``, ``backward``, ...;
            ``state_shape`` is ``(dim,)`` and cannot be set).

    With ``alpha = 0`` most equilibria lie on a level set of ``V`` where the projection is
    active; there ``I - df_V/dz`` is singular and the implicit backward's linear solve may not
    converge (it warns). ``backward="jfb"`` or ``"unrolled"`` avoid that; see
    ``docs/robustness.md``.

    Shapes: ``x`` ``(B, D)`` -> ``(B, out_features)``.
    """

    def __init__(self, f: nn.Module, dim: int, *, hidden: Sequence[int] = (64, 64),
                 alpha: float = 0.0, eps: float = 1e-2, activation: str = "softplus",
                 out_features: int | None = None, **kwargs: Any) -> None:
        if "state_shape" in kwargs:
            raise TypeError("LyapunovDEQ sets state_shape=(dim,) itself; pass dim")
        if not isinstance(f, nn.Module):
            raise TypeError(f"f must be an nn.Module called as f(z, x), got {type(f).__name__}")
        check_number(dim, "dim", 1, integer=True)
        lyapunov = LyapunovFunction(dim, hidden, eps=eps, activation=activation)
        super().__init__(LyapunovDynamics(f, lyapunov, alpha), state_shape=(dim,), **kwargs)
        out = dim if out_features is None else out_features
        check_number(out, "out_features", 1, integer=True)
        self.orthogonal = orthogonal(nn.Linear(dim, out, bias=False))

    @property
    def lyapunov(self) -> LyapunovFunction:
        """The learned Lyapunov function ``V``."""
        return self.f.lyapunov

    def initial_state(self, x: Tensor, z0: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``z0 = x`` (a given ``z0`` takes precedence)."""
        if z0 is not None:
            return check_state(z0, x, self.state_shape, "z0"), None
        return check_state(x, x, self.state_shape, "x (the initial state of LyapunovDEQ)"), None

    def equilibrium_state(self, x: Tensor, z0: Tensor | None = None) -> Tensor:
        """``x`` ``(B, D)`` -> ``z*`` ``(B, D)``, before the orthogonal layer."""
        return super().forward(x, z0)

    def forward(self, x: Tensor, z0: Tensor | None = None) -> Tensor:
        """``x`` ``(B, D)`` -> ``Q z*`` ``(B, out_features)``; ``z0`` optional start."""
        return self.orthogonal(self.equilibrium_state(x, z0))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.f.alpha:g}"
