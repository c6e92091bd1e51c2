"""Weight normalizations that stay FIXED while a layer solves for its equilibrium.

A solver calls ``f`` tens of times per forward and once more in the backward; all those calls
must see the same function. ``torch.nn.utils.parametrizations.spectral_norm`` runs a power
iteration on *every* weight access in training mode, so ``f`` changes between solver calls (and
between the forward and the backward). :func:`spectral_norm_cap` instead keeps the power
iteration's vectors as buffers and advances them only when :func:`update_normalization` is
called, which the contdeq layers do once per forward (training mode only).

Use :func:`spectral_norm_cap` on the weight multiplying ``z`` when ``f`` must stay contractive
(``||W||_2 <= cap < 1`` with a 1-Lipschitz activation bounds ``||df/dz|| <= cap``): without a
bound, forward NFE and backward iterations grow during training and accuracy can collapse.
:func:`weight_norm` (``W = g v / ||v||``) is stateless, hence fixed between calls; it speeds up
optimisation but does not bound ``||df/dz||`` by itself.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._warnings import warn
from .checks import check_number

__all__ = [
    "SpectralNormCap",
    "fixed_normalization",
    "spectral_norm_cap",
    "update_normalization",
    "weight_norm",
]

#: Per thread, inside :func:`fixed_normalization`: ``vectors`` maps ``id(SpectralNormCap)`` to
#: the ``(u, v)`` of the layer call running in this thread, ``weights`` caches capped weights.
_FIXED = threading.local()


def _as_matrix(weight: Tensor, dim: int) -> Tensor:
    """``weight`` as a 2-D matrix with ``dim`` as rows (conv kernels: rows = output channels)."""
    if dim != 0:
        weight = weight.movedim(dim, 0)
    return weight.reshape(weight.shape[0], -1)


class SpectralNormCap(nn.Module):
    """Parametrization ``W -> W * min(1, cap / sigma(W))`` with ``sigma`` from a power iteration.

    ``sigma = u^T W v`` uses the buffers ``u`` (rows) and ``v`` (columns), which change only in
    :meth:`update`; between updates the map is a fixed, differentiable function of ``W``.

    Args:
        weight: ``(out, ...)`` the weight to be capped (sets the buffer shapes, dtype, device).
        cap: the bound ``c > 0`` on the spectral norm.
        dim: the dimension of ``weight`` that indexes rows (``0``; ``1`` for transposed convs).
        n_power_iterations: power iterations per :meth:`update` (>= 1).
        warmup_iterations: power iterations at construction. One iteration from a random
            vector underestimates ``sigma`` (the cap would not hold at initialization).
        eps: guards the normalizations.
    """

    def __init__(
        self,
        weight: Tensor,
        *,
        cap: float = 1.0,
        dim: int = 0,
        n_power_iterations: int = 1,
        warmup_iterations: int = 50,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if weight.ndim < 2:
            raise ValueError(
                f"weight must have at least 2 dimensions, got shape {tuple(weight.shape)}"
            )
        if isinstance(dim, bool) or not isinstance(dim, int) or not (
                -weight.ndim <= dim < weight.ndim):
            raise ValueError(f"dim must be an int in [{-weight.ndim}, {weight.ndim - 1}] (a "
                             f"dimension of the weight of shape {tuple(weight.shape)}), got "
                             f"{dim!r}")
        check_number(cap, "cap", 0, strict=True)
        check_number(n_power_iterations, "n_power_iterations", 1, integer=True)
        check_number(warmup_iterations, "warmup_iterations", 0, integer=True)
        self.cap = float(cap)
        self.dim = dim
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        mat = _as_matrix(weight.detach(), dim)
        u = nn.functional.normalize(torch.randn(mat.shape[0], dtype=mat.dtype, device=mat.device),
                                    dim=0, eps=eps)
        v = nn.functional.normalize(torch.randn(mat.shape[1], dtype=mat.dtype, device=mat.device),
                                    dim=0, eps=eps)
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        if warmup_iterations:
            self.update(weight, warmup_iterations)

    @torch.no_grad()
    def update(self, weight: Tensor, n_iterations: int | None = None) -> None:
        """Advance the power iteration on ``weight`` (replaces the buffers, never in place, so
        a backward pass still pending sees the vectors its forward used). Runs in the buffers'
        dtype, outside ``torch.autocast``."""
        u, v = self.u, self.v
        with torch.autocast(weight.device.type, enabled=False):
            mat = _as_matrix(weight.detach(), self.dim).to(u.dtype)
            for _ in range(self.n_power_iterations if n_iterations is None else n_iterations):
                v = nn.functional.normalize(mat.t() @ u, dim=0, eps=self.eps)
                u = nn.functional.normalize(mat @ v, dim=0, eps=self.eps)
        self.u = u.clone()
        self.v = v.clone()

    def sigma(self, weight: Tensor) -> Tensor:
        """The current estimate ``u^T W v`` of ``||W||_2`` (differentiable in ``W``); inside
        :func:`fixed_normalization`, with the vectors it fixed for this thread. Computed in
        the buffers' dtype outside ``torch.autocast`` (a 0-dim tensor of that dtype)."""
        fixed = getattr(_FIXED, "vectors", None)
        u, v = fixed.get(id(self), (self.u, self.v)) if fixed else (self.u, self.v)
        with torch.autocast(weight.device.type, enabled=False):
            return torch.dot(u, _as_matrix(weight, self.dim).to(u.dtype) @ v)

    def forward(self, weight: Tensor) -> Tensor:
        """``weight * min(1, cap / sigma)``, computed once per :func:`fixed_normalization`
        scope, thread and grad mode for the same ``weight``."""
        cache = getattr(_FIXED, "weights", None)
        key = (id(self), torch.is_grad_enabled())
        if cache is not None and key in cache and cache[key][0] is weight:
            return cache[key][1]
        factor = torch.clamp(self.cap / self.sigma(weight).clamp_min(self.eps), max=1.0)
        capped = weight * factor
        if cache is not None:
            cache[key] = (weight, capped)
        return capped

    def extra_repr(self) -> str:
        return f"cap={self.cap}, n_power_iterations={self.n_power_iterations}"


def spectral_norm_cap(
    module: nn.Module,
    name: str = "weight",
    cap: float = 1.0,
    *,
    dim: int | None = None,
    n_power_iterations: int = 1,
    warmup_iterations: int = 50,
) -> nn.Module:
    """Cap ``||module.<name>||_2 <= cap``, fixed during each solve; returns ``module``.

    The power iteration is warmed up here and advanced once per forward of the enclosing contdeq
    layer (training mode). Example: ``spectral_norm_cap(nn.Linear(128, 128), cap=0.9)``.

    For a convolution the cap applies to the kernel reshaped to ``(C_out, C_in * k_h * k_w)``,
    not to the convolution operator, whose norm can be up to ``sqrt(k_h * k_w)`` times larger
    (3x for a 3x3 kernel). To bound the operator norm by ``c``, pass
    ``cap=c / sqrt(k_h * k_w)``.

    Args:
        module: the module holding the weight (e.g. ``nn.Linear``, ``nn.Conv2d``).
        name: the weight's attribute name.
        cap: the bound ``c``.
        dim: row dimension (default 1 for ``ConvTranspose*``, else 0).
        n_power_iterations: power iterations per layer forward.
        warmup_iterations: power iterations now.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"module {type(module).__name__} has no tensor attribute {name!r}")
    if dim is None:
        dim = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
    parametrize.register_parametrization(
        module, name, SpectralNormCap(weight, cap=cap, dim=dim,
                                      n_power_iterations=n_power_iterations,
                                      warmup_iterations=warmup_iterations),
    )
    return module


def weight_norm(module: nn.Module, name: str = "weight", dim: int = 0) -> nn.Module:
    """Weight normalization ``W = g * v / ||v||`` (torch's stateless parametrization).

    Deterministic, so ``f`` stays the same function between solver calls; returns ``module``.
    """
    return nn.utils.parametrizations.weight_norm(module, name=name, dim=dim)


@torch.no_grad()
def update_normalization(module: nn.Module) -> int:
    """Advance the power iteration of every :class:`SpectralNormCap` in ``module``.

    Called once per forward by the contdeq layers in training mode. Returns how many were
    updated.
    """
    count = 0
    for sub in module.modules():
        if not parametrize.is_parametrized(sub):
            continue
        for plist in sub.parametrizations.values():
            if not any(isinstance(p, SpectralNormCap) for p in plist):
                continue
            value = plist.original
            for p in plist:
                if isinstance(p, SpectralNormCap):
                    p.update(value)
                    count += 1
                value = p(value)
    return count


@contextlib.contextmanager
def fixed_normalization(module: nn.Module) -> Iterator[None]:
    """Within the block, every :class:`SpectralNormCap` in ``module`` uses the power-iteration
    vectors it has now, in this thread, even if another thread advances them, and computes its
    capped weight once (per grad mode) instead of on every access.

    The contdeq layers wrap each call in it, so ``f`` is one fixed function for the whole
    solve. It replaces ``torch.nn.utils.parametrize.cached()``, whose cache is shared by all
    threads (a thread would reuse another's weight and its graph).
    """
    caps = [m for m in module.modules() if isinstance(m, SpectralNormCap)]
    outer = getattr(_FIXED, "vectors", None), getattr(_FIXED, "weights", None)
    _FIXED.vectors = {**(outer[0] or {}), **{id(c): (c.u, c.v) for c in caps}}
    _FIXED.weights = {}
    try:
        yield
    finally:
        _FIXED.vectors, _FIXED.weights = outer


def fixed_vectors() -> dict[int, tuple[Tensor, Tensor]]:
    """The power-iteration vectors the enclosing :func:`fixed_normalization` fixed in this
    thread (``{}`` outside one), for :func:`restored_normalization`."""
    return dict(getattr(_FIXED, "vectors", None) or {})


@contextlib.contextmanager
def restored_normalization(vectors: dict[int, tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Within the block, every :class:`SpectralNormCap` with an entry in ``vectors`` (from
    :func:`fixed_vectors`) uses those vectors: a backward pass that calls ``f`` again after its
    forward (``NeuralODE``'s adjoint) differentiates the ``f`` the forward solved, even where a
    later forward advanced the power iteration. Capped weights are not cached."""
    outer = getattr(_FIXED, "vectors", None), getattr(_FIXED, "weights", None)
    _FIXED.vectors = {**(outer[0] or {}), **vectors}
    _FIXED.weights = None
    try:
        yield
    finally:
        _FIXED.vectors, _FIXED.weights = outer


def warn_unstable_normalization(module: nn.Module, owner: str) -> None:
    """Warn when ``module`` uses torch's spectral norm, which changes ``f`` on every call."""
    for sub in module.modules():
        hooks = getattr(sub, "_forward_pre_hooks", {}).values()
        unstable = any(type(h).__name__ == "SpectralNorm" for h in hooks)
        if parametrize.is_parametrized(sub):
            unstable |= any(
                type(p).__name__ == "_SpectralNorm"
                for plist in sub.parametrizations.values() for p in plist
            )
        if unstable:
            warn(
                f"{owner}: f uses torch's spectral_norm, which runs a power iteration on every "
                "call in training mode, so f changes between solver calls and between forward "
                "and backward; use contdeq.spectral_norm_cap instead",
                UserWarning,
            )
            return
