"""Lyapunov-stable equilibrium layers: :class:`LyapunovDEQ` and its parts.

LyaDEQ (Chu, Wei, Liu & Zhao, "Lyapunov-Stable Deep Equilibrium Models", AAAI 2024) reads a
DEQ as the dynamical system ``dz/dt = f(z, x) - z`` and makes its equilibrium Lyapunov stable
with the stable-dynamics projection of Kolter & Manek ("Learning Stable Deep Dynamics
Models", NeurIPS 2019): with a learned convex, positive definite ``V_0``, the nominal vector
field ``r = f(z, x) - z`` is replaced by::

    r_V = r - grad V(z) * relu(grad V(z)^T r + alpha * V(z)) / ||grad V(z)||^2

so that ``dV/dt = grad V^T r_V <= -alpha * V`` along every trajectory. A Lyapunov function
certifies the stability of the point where it is zero, so ``V`` is placed at the equilibrium:
``V(z) = V_0(f(z, x) - z)`` is zero exactly at the equilibria of ``f`` and positive elsewhere,
and every equilibrium of the projected field (where ``grad V != 0``) is an equilibrium of
``f``. An orthogonal linear layer after the equilibrium keeps the equilibria of different
inputs apart. See ``docs/robustness.md`` for the construction, its guarantee and where it
differs from the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from ..implicit import ForwardSolver
from ..solvers import SolverStats
from .checks import check_module, check_number
from .deq import DEQ
from .init import Input
from .modifiers import MODIFIERS, Modifier

__all__ = ["ICNN", "ICNN_ACTIVATIONS", "LyapunovDEQ", "LyapunovDynamics", "LyapunovFunction",
           "LyapunovProjection", "LyapunovSolver", "projected_map"]

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


def _value_and_grad(fx: Callable[[Tensor], Tensor], lyapunov: nn.Module, z: Tensor,
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """``(r, V, grad V)`` at ``z`` for ``r = fx(z) - z`` and ``V = V_0(r)`` (flattened per
    sample); ``(B, ...)``, ``(B,)``, ``(B, ...)``. Differentiable when grad is enabled."""
    record = torch.is_grad_enabled()
    with torch.enable_grad():
        zg = z if z.requires_grad else z.detach().requires_grad_(True)
        r = fx(zg) - zg
        v = lyapunov(r.flatten(1))
        (grad,) = torch.autograd.grad(v.sum(), zg, create_graph=record)
    if not record:
        r, v = r.detach(), v.detach()
    return r, v, grad


def lyapunov_value(fx: Callable[[Tensor], Tensor], lyapunov: nn.Module, z: Tensor) -> Tensor:
    """``V(z) = V_0(fx(z) - z)``, ``(B, ...)`` -> ``(B,)``."""
    return lyapunov((fx(z) - z).flatten(1))


def projected_map(fx: Callable[[Tensor], Tensor], lyapunov: nn.Module, alpha: float, z: Tensor,
                  ) -> Tensor:
    """``z + r_V(z)``: one evaluation of the projected map (``(B, ...)`` -> ``(B, ...)``).

    ``r = fx(z) - z``, ``V = V_0(r)``; ``grad V = J_r^T grad V_0(r)`` comes from autograd (one
    vector-Jacobian product of ``fx``). Where ``grad V = 0`` (at the equilibria of ``fx``,
    where ``r = 0``) the correction is zero; rates within rounding error of zero count as zero.
    """
    r, v, grad = _value_and_grad(fx, lyapunov, z)
    dims = tuple(range(1, z.ndim))
    flow = (grad * r).sum(dim=dims)
    rate = flow + alpha * v
    scale = (grad * r).abs().sum(dim=dims) + alpha * v.abs()
    active = rate > _ROUNDING * torch.finfo(z.dtype).eps * scale
    excess = torch.where(active, rate, torch.zeros_like(rate))
    norm2 = (grad * grad).sum(dim=dims).clamp_min(torch.finfo(z.dtype).tiny)
    coef = (excess / norm2).reshape(-1, *([1] * (z.ndim - 1)))
    return z + r - grad * coef


class LyapunovDynamics(nn.Module):
    """The projected map ``f_V(z, x) = z + r_V`` (module form of :func:`projected_map`).

    Args:
        f: the nominal ``f(z, x)``.
        lyapunov: ``V_0``, ``(B, D) -> (B,)``, convex and positive definite; ``V(z) =
            V_0(f(z, x) - z)``.
        alpha: decay rate (> 0): ``dV/dt <= -alpha V`` along the projected flow.

    Shapes: ``z`` ``(B, D)``, ``x`` ``(B, ...)`` -> ``(B, D)``.
    """

    def __init__(self, f: nn.Module, lyapunov: nn.Module, alpha: float = 1.0) -> None:
        super().__init__()
        check_number(alpha, "alpha", 0, strict=True, finite=True)
        self.f = f
        self.lyapunov = lyapunov
        self.alpha = float(alpha)

    def value(self, z: Tensor, x: Tensor) -> Tensor:
        """``V(z) = V_0(f(z, x) - z)``, ``(B,)``."""
        return lyapunov_value(lambda s: self.f(s, x), self.lyapunov, z)

    def value_and_grad(self, z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(V(z), grad V(z))``, ``(B,)`` and ``(B, D)``; differentiable when grad is on."""
        _, v, grad = _value_and_grad(lambda s: self.f(s, x), self.lyapunov, z)
        return v, grad

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        """``z`` ``(B, D)``, ``x`` ``(B, ...)`` -> ``z + r_V(z, x)`` ``(B, D)``."""
        return projected_map(lambda s: self.f(s, x), self.lyapunov, self.alpha, z)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"


class _Projected:
    """``z -> z + r_V(z)`` around a layer's map ``fx``; its input ``x`` is ``fx``'s, so a
    layer callback that changes the input (``Restart(x=...)``) rebinds both
    (:meth:`with_input`)."""

    def __init__(self, fx: Callable[[Tensor], Tensor], lyapunov: nn.Module, alpha: float):
        self.fx, self.lyapunov, self.alpha = fx, lyapunov, alpha

    @property
    def x(self) -> Tensor | None:
        return getattr(self.fx, "x", None)

    def with_input(self, x: Tensor) -> _Projected:
        """The projected map around ``fx`` bound to the input ``x``."""
        return _Projected(self.fx.with_input(x), self.lyapunov, self.alpha)  # type: ignore[attr-defined]

    def __call__(self, z: Tensor) -> Tensor:
        return projected_map(self.fx, self.lyapunov, self.alpha, z)


class LyapunovSolver(ForwardSolver):
    """A forward solver that solves the projected field and keeps ``V`` from rising.

    Called as ``solver(fx, z0)`` with the *nominal* map ``fx(z) = f(z, x)`` (so the implicit
    backward differentiates ``f`` at ``z*``: there ``r = 0``, ``z*`` is an equilibrium of
    ``f`` and the implicit function theorem of ``f`` gives its derivative), it runs the
    configured solver on the projected map, then compares ``V(z_end)`` with ``V(z0)`` per
    sample and returns ``z0`` for any sample whose solve ended higher (only possible for a
    solver that does not follow the flow and did not converge, or for a start already within
    tolerance of an equilibrium). Every returned state therefore satisfies
    ``V(z) <= V(z0)``, whichever solver ran. Costs two evaluations of ``fx`` beyond the
    solve (not counted in ``stats.nfe``, which counts evaluations of the projected map, each
    one evaluation of ``fx`` and one vector-Jacobian product).

    Args:
        base: the configured solver (any ``solver`` and options of a ``DEQ``).
        lyapunov: ``V_0``.
        alpha: decay rate (> 0).
    """

    def __init__(self, base: ForwardSolver, lyapunov: nn.Module, alpha: float) -> None:
        if base.options.get("backend") == "event":
            raise ValueError("LyapunovDEQ needs the step callback of its solver to keep its "
                             "guarantee checkable; backend='event' has none: use the default "
                             "backend")
        super().__init__(base.solver, on_nonconvergence=base.on_nonconvergence, **base.options)
        self.lyapunov = lyapunov
        self.alpha = float(alpha)

    def __call__(self, fx: Callable[[Tensor], Tensor], z0: Tensor) -> tuple[Tensor, SolverStats]:
        """Solve the projected field from ``z0`` (``(B, D)``); returns ``(z, stats)``."""
        z, stats = super().__call__(self.step_map(fx), z0)
        with torch.no_grad():
            v0 = lyapunov_value(fx, self.lyapunov, z0)
            v_end = lyapunov_value(fx, self.lyapunov, z.detach())
        keep = (v_end <= v0).reshape(-1, *([1] * (z.ndim - 1)))
        if bool(keep.all()):
            return z, stats
        return torch.where(keep, z, z0.to(z.dtype)), stats

    def with_options(self, **options: Any) -> LyapunovSolver:
        """A copy with ``options`` overriding this solver's options."""
        return LyapunovSolver(super().with_options(**options), self.lyapunov, self.alpha)

    def rebuild(self, base: ForwardSolver) -> LyapunovSolver:
        """``base`` (another solver, e.g. one substituted for an attack) on the same
        projected field, with the same guarantee."""
        return LyapunovSolver(base, self.lyapunov, self.alpha)

    def step_map(self, fx: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """The projected map ``z -> z + r_V(z)`` around the nominal map ``fx``."""
        return _Projected(fx, self.lyapunov, self.alpha)

    def __repr__(self) -> str:
        return f"Lyapunov{super().__repr__()}"


@MODIFIERS.register("lyapunov")
class LyapunovProjection(Modifier):
    """Dynamics modifier: the layer solves the Lyapunov-projected field ``r_V`` of its ``f``
    (:class:`LyapunovSolver` around its forward solvers), so ``V(z) <= V(z0)`` for the
    returned state, whichever solver runs; works with any initial-state policy and structure
    (on a multi-scale layer ``V_0`` takes the flat ``(B, N)`` state).

    Args:
        lyapunov: ``V_0``, ``(B, D) -> (B,)``, convex and positive definite (e.g.
            :class:`LyapunovFunction`), registered on the layer as ``layer.lyapunov``.
        alpha: decay rate of ``V`` (> 0, default 1).

    Example: ``DEQ(f, state_shape=(D,), init=Predictor(net),
    modifiers=(LyapunovProjection(LyapunovFunction(D)),), backward_method="gmres")``.
    """

    def __init__(self, lyapunov: nn.Module, alpha: float = 1.0) -> None:
        if not isinstance(lyapunov, nn.Module):
            raise TypeError(f"lyapunov must be an nn.Module mapping (B, D) to (B,), got "
                            f"{type(lyapunov).__name__}")
        self.lyapunov = lyapunov
        self.alpha = float(check_number(alpha, "alpha", 0, strict=True, finite=True))

    def modules(self) -> dict[str, nn.Module]:
        return {"lyapunov": self.lyapunov}

    def solver(self, base: ForwardSolver, training: bool) -> ForwardSolver:
        return LyapunovSolver(base, self.lyapunov, self.alpha)

    def __repr__(self) -> str:
        return f"LyapunovProjection(alpha={self.alpha:g})"


class LyapunovDEQ(DEQ):
    """Lyapunov-stable DEQ (LyaDEQ): the equilibrium of ``f`` reached along the projected
    field ``r_V``, started from the input features, followed by an orthogonal linear layer.

    ``V(z) = V_0(f(z, x) - z)`` with ``V_0`` convex and positive definite
    (:class:`LyapunovFunction` by default), so ``V >= 0`` vanishes exactly at the equilibria
    of ``f``; the projection makes ``dV/dt <= -alpha V`` along the flow, so ``V`` decays to 0
    (``V(z(t)) <= exp(-alpha t) V(z0)``) and an equilibrium of ``f`` where ``I - df/dz`` is
    invertible is exponentially stable for the projected flow, even where it is unstable for
    the nominal one. Every equilibrium of the projected field with ``grad V != 0`` is an
    equilibrium of ``f``, so the layer's gradient is the implicit one of ``f`` (``V``'s
    parameters get gradients only from ``backward="unrolled"``). Guarantee, for every
    solver: the returned state satisfies ``V(z) <= V(z0)`` (see :class:`LyapunovSolver`).

    The trajectory starts at ``z0 = x`` (LyaDEQ solves from the feature extractor's output);
    ``f(z, x)`` still sees ``x`` as input injection. ``layer.f`` is the nominal ``f`` and
    ``layer.lyapunov`` is ``V_0``. The short name of ``DEQ(f, state_shape=(dim,),
    init=Input(), modifiers=(LyapunovProjection(V_0, alpha),))`` followed by the orthogonal
    layer (``init`` and further ``modifiers`` may be passed).

    Args:
        f: ``f(z, x)`` on ``(B, dim)`` states.
        dim: state size ``D`` (``x`` must be ``(B, D)`` unless ``z0`` is given).
        hidden: hidden widths of ``V_0``'s ICNN.
        alpha: decay rate of ``V`` (> 0, default 1).
        eps: quadratic weight of ``V_0`` (> 0).
        activation: the ICNN's activation, ``"softplus"`` or ``"smooth_relu"``.
        lyapunov: a ``V_0`` module, ``(B, D) -> (B,)``, to use instead of building one
            (``hidden``, ``eps`` and ``activation`` are then unused); it must be positive
            definite for the stability statements above.
        out_features: outputs of the orthogonal layer (default ``D``).
        **kwargs: the options of :class:`~contdeq.DEQ` (``solver``, ``backward``, ...;
            ``state_shape`` is ``(dim,)`` and cannot be set). With ``backward="implicit"``
            the linear solve defaults to ``backward_method="gmres"`` (it converges where
            ``f`` is not contractive, which the projection allows).

    Shapes: ``x`` ``(B, D)`` -> ``(B, out_features)``.
    """

    def __init__(self, f: nn.Module, dim: int, *, hidden: Sequence[int] = (64, 64),
                 alpha: float = 1.0, eps: float = 1e-2, activation: str = "softplus",
                 lyapunov: nn.Module | None = None, out_features: int | None = None,
                 **kwargs: Any) -> None:
        if "state_shape" in kwargs:
            raise TypeError("LyapunovDEQ sets state_shape=(dim,) itself; pass dim")
        check_module(f, "f", "f(z, x)")
        check_number(dim, "dim", 1, integer=True)
        check_number(alpha, "alpha", 0, strict=True, finite=True)
        if lyapunov is None:
            lyapunov = LyapunovFunction(dim, hidden, eps=eps, activation=activation)
        elif not isinstance(lyapunov, nn.Module):
            raise TypeError(f"lyapunov must be an nn.Module mapping (B, {dim}) to (B,), got "
                            f"{type(lyapunov).__name__}")
        if kwargs.get("backward", "implicit") == "implicit" and "backward_method" not in kwargs:
            kwargs["backward_method"] = "gmres"
        kwargs.setdefault("init", Input())
        projection = LyapunovProjection(lyapunov, alpha)
        modifiers = (*kwargs.pop("modifiers", ()), projection)
        super().__init__(f, state_shape=(dim,), modifiers=modifiers, **kwargs)
        self.alpha = projection.alpha
        out = dim if out_features is None else out_features
        check_number(out, "out_features", 1, integer=True)
        self.orthogonal = orthogonal(nn.Linear(dim, out, bias=False))

    def value(self, z: Tensor, x: Tensor) -> Tensor:
        """``V(z) = V_0(f(z, x) - z)``: ``z`` ``(B, D)``, ``x`` ``(B, ...)`` -> ``(B,)``."""
        return lyapunov_value(lambda s: self.f(s, x), self.lyapunov, z)

    def equilibrium_state(self, x: Tensor, z0: Tensor | None = None) -> Tensor:
        """``x`` ``(B, D)`` -> ``z*`` ``(B, D)``, before the orthogonal layer."""
        return super().forward(x, z0)

    def forward(self, x: Tensor, z0: Tensor | None = None) -> Tensor:
        """``x`` ``(B, D)`` -> ``Q z*`` ``(B, out_features)``; ``z0`` optional start."""
        return self.orthogonal(self.equilibrium_state(x, z0))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha:g}"
