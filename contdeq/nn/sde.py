"""A neural SDE baseline with the same ``f(z, x)`` signature as the equilibrium layers.

:class:`NeuralSDE` integrates ``dz = (f(z, x) - z) dt + g(z, x) dW`` (diagonal noise) with
torchsde (``sdeint``, or ``sdeint_adjoint`` for memory independent of the steps). The drift
is the vector field of a continuous :class:`~contdeq.DEQ` and of
:class:`~contdeq.NeuralODE` with the same ``f``. :class:`DriftDiffusion` is the adapter
torchsde calls; :class:`~contdeq.NoisyDEQ` uses it too.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchsde
from torch import Tensor, nn

from ..implicit import check_output, first_call
from ..implicit.diagnostics import from_autocast
from ..solvers import NonFiniteError
from .checks import check_module, check_number
from .deq import check_layer_input, resolve_state_shape, zeros_or_state
from .normalization import (
    fixed_normalization,
    fixed_vectors,
    restored_normalization,
    update_normalization,
    warn_unstable_normalization,
)

__all__ = ["SDE_METHODS", "DriftDiffusion", "NeuralSDE"]

#: torchsde methods for diagonal noise, by SDE type.
SDE_METHODS = {
    "ito": ("euler", "milstein", "srk"),
    "stratonovich": ("midpoint", "heun", "euler_heun", "milstein", "reversible_heun", "log_ode"),
}


class DriftDiffusion(nn.Module):
    """torchsde's ``sde`` object for ``dz = (f(z, x) - z) dt + diffusion(z, x) dW``.

    torchsde works on flat ``(B, D)`` states; this adapter views them as ``(B, *shape)`` for
    ``f`` and ``diffusion`` and flattens their outputs. ``diffusion=None`` switches the noise
    off (the drift-only equation, solved by the same scheme).

    Args:
        f: ``f(z, x)``, returning a tensor shaped like ``z``.
        diffusion: ``diffusion(z, x)``, returning the diagonal noise scale shaped like ``z``,
            or ``None``.
        x: ``(B, ...)`` input of this solve.
        shape: per-sample state shape.
        sde_type: ``"ito"`` or ``"stratonovich"``.

    Shapes: torchsde's ``y`` ``(B, D)`` with ``D = prod(shape)``.
    """

    noise_type = "diagonal"

    def __init__(self, f: nn.Module, diffusion: Callable[[Tensor, Tensor], Tensor] | None,
                 x: Tensor, shape: tuple[int, ...], sde_type: str = "ito") -> None:
        super().__init__()
        self.func = f
        self.diffusion = diffusion
        self.x = x
        self.shape = shape
        self.sde_type = sde_type
        self.calls = 0
        #: spectral_norm_cap vectors the calls use (:func:`fixed_vectors`; ``{}``: the
        #: current ones), so an adjoint pass run later sees its forward's.
        self.vectors: dict[int, tuple[Tensor, Tensor]] = {}

    def _normalization(self) -> Any:
        return (restored_normalization(self.vectors) if self.vectors
                else contextlib.nullcontext())

    def _state(self, y: Tensor) -> Tensor:
        return y.view(y.shape[0], *self.shape)

    def f(self, t: Tensor, y: Tensor) -> Tensor:
        """The drift ``f(z, x) - z``, ``(B, D)``."""
        z = self._state(y)
        with self._normalization():
            out = first_call(self.func, z, self.x) if self.calls == 0 else self.func(z, self.x)
        self.calls += 1
        return (out - z).reshape(z.shape[0], -1)

    def g(self, t: Tensor, y: Tensor) -> Tensor:
        """The diagonal diffusion, ``(B, D)`` (zeros when the noise is off)."""
        if self.diffusion is None:
            return torch.zeros_like(y)
        z = self._state(y)
        with self._normalization():
            out = self.diffusion(z, self.x)
        return check_output(from_autocast(out, z), z, "g").reshape(z.shape[0], -1)


def integrate_sde(sde: DriftDiffusion, z0: Tensor, t_end: float, *, method: str, dt: float,
                  adjoint: bool = False, params: Sequence[Tensor] = (),
                  fixed_path: bool = False) -> Tensor:
    """``z(t_end)`` of ``sde`` from ``z0`` (``(B, *shape)``) by torchsde, fixed step ``dt``.

    With ``adjoint`` the gradients of ``params`` (and of nothing else) come from torchsde's
    stochastic adjoint. The Brownian path's entropy is drawn from torch's global generator
    (torchsde would draw it from numpy's), so ``torch.manual_seed`` fixes the path;
    ``fixed_path`` uses entropy 0 and leaves the global random states alone (for a noise-free
    solve, where the path does not matter). NaN/Inf in the result raise
    :class:`~contdeq.solvers.NonFiniteError`.
    """
    ts = torch.tensor([0.0, t_end], dtype=z0.dtype, device=z0.device)
    y0 = z0.reshape(z0.shape[0], -1)  # (B, D), also for a (B,) state
    entropy = 0 if fixed_path else int(torch.randint(0, 2**31 - 1, ()))
    with torch.random.fork_rng(devices=[z0.device] if z0.is_cuda else [],
                               enabled=fixed_path):
        bm = torchsde.BrownianInterval(t0=0.0, t1=t_end, size=tuple(y0.shape), dtype=y0.dtype,
                                       device=y0.device, entropy=entropy)
        if adjoint:
            ys = torchsde.sdeint_adjoint(sde, y0, ts, bm=bm, method=method, dt=dt,
                                         adjoint_params=tuple(params))
        else:
            ys = torchsde.sdeint(sde, y0, ts, bm=bm, method=method, dt=dt)
    z = ys[-1].view_as(z0)
    if not bool(torch.isfinite(z).all()):
        raise NonFiniteError(
            f"the SDE's state at t={t_end:g} contains NaN or Inf after {sde.calls} drift calls "
            f"(step dt={dt:g} too large for the dynamics, or diverging dynamics)", sde.calls)
    return z


class NeuralSDE(nn.Module):
    """Neural SDE baseline: ``z(t_end)`` of ``dz = (f(z, x) - z) dt + g(z, x) dW``, ``z(0) = z0``.

    The drift is the vector field of a continuous :class:`~contdeq.DEQ` (and of
    :class:`~contdeq.NeuralODE`) with the same ``f``; ``g`` gives diagonal noise. Training mode
    samples a Brownian path per call. **Evaluation mode is deterministic**: the noise is
    switched off and the same scheme with the same ``dt`` solves the drift-only equation (the
    noise-free path, not the mean of the SDE, which differs for non-linear ``f``); torch's and
    numpy's global random states are not advanced. Training paths are seeded from torch's
    global generator (``torch.manual_seed`` reproduces them).

    Args:
        f: ``nn.Module`` called as ``f(z, x)``.
        g: ``nn.Module`` called as ``g(z, x)``, returning the noise scale shaped like ``z``.
        t_end: integration time (> 0).
        method: torchsde method (default ``"euler"``, Euler-Maruyama; see
            :data:`SDE_METHODS`).
        sde_type: ``"ito"`` (default) or ``"stratonovich"``.
        adjoint: backpropagate with torchsde's stochastic adjoint (``sdeint_adjoint``; memory
            independent of the steps) instead of through the steps.
        dt: fixed step size (> 0, at most ``t_end``).
        state_shape: per-sample state shape (default ``x``'s); ``z0`` defaults to zeros.

    Shapes: ``x`` ``(B, ...)`` -> ``(B, *state_shape)``.
    """

    def __init__(self, f: nn.Module, g: nn.Module, t_end: float = 1.0, *,
                 method: str = "euler", sde_type: str = "ito", adjoint: bool = False,
                 dt: float = 0.05, state_shape: int | Sequence[int] | None = None) -> None:
        super().__init__()
        for name, module in (("f", f), ("g", g)):
            check_module(module, name, f"{name}(z, x)")
        check_number(t_end, "t_end", 0, strict=True, finite=True)
        check_number(dt, "dt", 0, strict=True, finite=True)
        if dt > t_end:
            raise ValueError(f"dt must be at most t_end={t_end!r}, got {dt!r}")
        if sde_type not in SDE_METHODS:
            raise ValueError(f"sde_type must be one of {tuple(SDE_METHODS)}, got {sde_type!r}")
        if method not in SDE_METHODS[sde_type]:
            raise ValueError(f"method must be one of {SDE_METHODS[sde_type]} for "
                             f"sde_type={sde_type!r} (diagonal noise), got {method!r}")
        self.f = f
        self.g = g
        self.t_end = float(t_end)
        self.method = method
        self.sde_type = sde_type
        self.adjoint = bool(adjoint)
        self.dt = float(dt)
        self.state_shape = resolve_state_shape(state_shape)
        warn_unstable_normalization(f, "NeuralSDE")

    def forward(self, x: Tensor, z0: Tensor | None = None) -> Tensor:
        """``x`` ``(B, ...)`` -> ``z(t_end)`` ``(B, *state_shape)``."""
        x = check_layer_input(x, type(self).__name__)
        z0 = zeros_or_state(x, z0, self.state_shape)
        if self.training:
            update_normalization(self)  # f and g
        noisy = self.training
        sde = DriftDiffusion(self.f, self.g if noisy else None, x, tuple(z0.shape[1:]),
                             self.sde_type)
        use_adjoint = self.adjoint and torch.is_grad_enabled()
        params = [p for p in (*self.f.parameters(), *self.g.parameters()) if p.requires_grad]
        if x.requires_grad:
            params.append(x)
        with fixed_normalization(self):
            if use_adjoint:  # its backward calls f and g again, after this scope
                sde.vectors = fixed_vectors()
            return integrate_sde(sde, z0, self.t_end, method=self.method, dt=self.dt,
                                 adjoint=use_adjoint, params=params, fixed_path=not noisy)

    def extra_repr(self) -> str:
        steps = math.ceil(self.t_end / self.dt - 1e-9)
        return (f"dz = (f(z, x) - z) dt + g(z, x) dW, t_end={self.t_end:g}, "
                f"method={self.method!r}, sde_type={self.sde_type!r}, dt={self.dt:g} "
                f"({steps} steps), adjoint={self.adjoint}")
