"""Noise-injected training of continuous DEQs: :class:`NoisyDEQ` (deprecated).

At a unique equilibrium the noisy start does not change ``z*``, so the layer's output and
gradient are a plain :class:`~contdeq.DEQ`'s (measured within 6e-6): it is not a defence.
Importing ``NoisyDEQ`` from ``contdeq`` or ``contdeq.nn`` warns (:data:`DEPRECATION`); it will
be removed in the next release.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_number
from .deq import DEQ
from .sde import DriftDiffusion, integrate_sde

__all__ = ["DEPRECATION", "NoisyDEQ"]

#: The warning text of the deprecated name.
DEPRECATION = (
    "contdeq.NoisyDEQ is deprecated and will be removed in the next release: at a unique "
    "equilibrium the noisy start does not change z*, so its output and gradient are a plain "
    "DEQ's (it is not a defence). Use contdeq.DEQ for the same computation, or "
    "contdeq.NeuralSDE for noise injection along a finite-time SDE (Liu et al. 2019)."
)


class _ConstantNoise:
    """Diagonal diffusion ``sigma`` everywhere (``dW`` scaled by a constant)."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def __call__(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.full_like(z, self.sigma)


class NoisyDEQ(DEQ):
    """Deprecated (see :data:`DEPRECATION`): continuous DEQ trained from noisy starts.

    In training, each call first integrates ``dz = (f(z, x) - z) dt + noise * dW`` with
    torchsde (Euler-Maruyama, step ``noise_dt``) from the initial state up to a random time
    ``T ~ U(0, noise_time)`` (one per call), and the steady-state solver then starts from that
    state. Training thus sees the equilibrium reached from random points along noisy
    trajectories of the same dynamics (in the spirit of Yang et al.'s random intermediate
    states), while the gradient is the layer's usual one (implicit by default; the noisy
    prefix is not differentiated: ``z*`` does not depend on where the solve starts when the
    equilibrium is unique). In evaluation mode (or with ``noise=0``) the layer is exactly a
    :class:`~contdeq.DEQ`: deterministic, no noise.

    Args:
        f: as for :class:`~contdeq.DEQ`.
        noise: the diffusion ``sigma`` (>= 0).
        noise_time: upper end of the random time ``T`` (> 0).
        noise_dt: Euler-Maruyama step (> 0).
        **kwargs: the options of :class:`~contdeq.DEQ`; ``solver`` must be ``"ode"`` (the
            noise perturbs the continuous dynamics; a discrete fixed-point solver has none).

    Shapes: ``x`` ``(B, ...)`` -> ``z*`` ``(B, *state_shape)``.
    """

    def __init__(self, f: nn.Module, *, noise: float, noise_time: float = 1.0,
                 noise_dt: float = 0.1, **kwargs: Any) -> None:
        super().__init__(f, **kwargs)
        if self.solver.solver != "ode":
            raise ValueError(
                f"NoisyDEQ needs solver='ode': the noise perturbs the continuous dynamics "
                f"dz/dt = f(z, x) - z, which a discrete solver does not follow; got "
                f"solver={self.solver.solver!r}")
        self.noise = float(check_number(noise, "noise", 0, finite=True))
        self.noise_time = float(check_number(noise_time, "noise_time", 0, strict=True,
                                             finite=True))
        self.noise_dt = float(check_number(noise_dt, "noise_dt", 0, strict=True, finite=True))

    def initial_state(self, x: Tensor, z0: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The base initial state, moved along a noisy trajectory in training."""
        z, guess = super().initial_state(x, z0)
        if not self.training or self.noise == 0:
            return z, guess
        t_end = float(torch.rand(())) * self.noise_time
        if t_end < self.noise_dt:  # less than one step: start where the base state is
            return z, guess
        sde = DriftDiffusion(self.f, _ConstantNoise(self.noise), x.detach(), tuple(z.shape[1:]))
        with torch.no_grad():
            z = integrate_sde(sde, z.detach(), t_end, method="euler", dt=self.noise_dt)
        return z, guess

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, noise={self.noise:g}, noise_time={self.noise_time:g}, "
                f"noise_dt={self.noise_dt:g}")
