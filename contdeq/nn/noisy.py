"""Noise along the dynamics: the :class:`Noise` modifier, and :class:`NoisyDEQ` (deprecated).

At a unique equilibrium the noisy start does not change ``z*``, so the layer's output and
gradient are a plain :class:`~contdeq.DEQ`'s (measured within 6e-6): it is not a defence.
Importing ``NoisyDEQ`` from ``contdeq`` or ``contdeq.nn`` warns (:data:`DEPRECATION`); it will
be removed in the next release. ``DEQ(f, modifiers=(Noise(sigma),))`` is the same computation
and combines with any initial state and structure.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_number
from .deq import DEQ
from .modifiers import MODIFIERS, Modifier
from .sde import DriftDiffusion, integrate_sde

__all__ = ["DEPRECATION", "Noise", "NoisyDEQ"]

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


@MODIFIERS.register("noise")
class Noise(Modifier):
    """Dynamics modifier: in training, the solve starts from a point of a noisy trajectory.

    Each training call first integrates ``dz = (f(z, x) - z) dt + sigma * dW`` with torchsde
    (Euler-Maruyama, step ``dt``) from the initial state (any policy's) up to a random time
    ``T ~ U(0, time)`` (one per call), without gradient and without counting these ``f``
    calls in ``stats.nfe``; the solver then starts from that state. Evaluation mode (or
    ``sigma=0``) is unchanged. Needs ``solver="ode"`` (the noise perturbs the continuous
    dynamics).

    Args:
        sigma: the diffusion (>= 0).
        time: upper end of the random time ``T`` (> 0).
        dt: Euler-Maruyama step (> 0).
    """

    def __init__(self, sigma: float, time: float = 1.0, dt: float = 0.1) -> None:
        self.sigma = float(check_number(sigma, "noise", 0, finite=True))
        self.time = float(check_number(time, "noise_time", 0, strict=True, finite=True))
        self.dt = float(check_number(dt, "noise_dt", 0, strict=True, finite=True))

    def check(self, layer: DEQ) -> None:
        if layer.solver.solver != "ode":
            raise ValueError(
                f"{type(layer).__name__} with Noise needs solver='ode': the noise perturbs the "
                f"continuous dynamics dz/dt = f(z, x) - z, which a discrete solver does not "
                f"follow; got solver={layer.solver.solver!r}")

    def start(self, layer: DEQ, x: Tensor, z0: Tensor) -> Tensor:
        if not layer.training or self.sigma == 0:
            return z0
        t_end = float(torch.rand(())) * self.time
        if t_end < self.dt:  # less than one step: start where the base state is
            return z0
        sde = DriftDiffusion(layer.f, _ConstantNoise(self.sigma), x.detach(),
                             tuple(z0.shape[1:]))
        with torch.no_grad():
            return integrate_sde(sde, z0.detach(), t_end, method="euler", dt=self.dt)

    def __repr__(self) -> str:
        return f"Noise(sigma={self.sigma:g}, time={self.time:g}, dt={self.dt:g})"


class NoisyDEQ(DEQ):
    """Deprecated (see :data:`DEPRECATION`): continuous DEQ trained from noisy starts, the
    short name of ``DEQ(f, modifiers=(Noise(noise, noise_time, noise_dt),))``.

    In training, each call first integrates ``dz = (f(z, x) - z) dt + noise * dW`` with
    torchsde (Euler-Maruyama, step ``noise_dt``) from the initial state up to a random time
    ``T ~ U(0, noise_time)`` (one per call), and the steady-state solver then starts from that
    state (see :class:`Noise`). Training thus sees the equilibrium reached from random points
    along noisy trajectories of the same dynamics (in the spirit of Yang et al.'s random
    intermediate states), while the gradient is the layer's usual one. In evaluation mode (or
    with ``noise=0``) the layer is exactly a :class:`~contdeq.DEQ`.

    Args:
        f: as for :class:`~contdeq.DEQ`.
        noise: the diffusion ``sigma`` (>= 0).
        noise_time: upper end of the random time ``T`` (> 0).
        noise_dt: Euler-Maruyama step (> 0).
        **kwargs: the options of :class:`~contdeq.DEQ`; ``solver`` must be ``"ode"``.

    Shapes: ``x`` ``(B, ...)`` -> ``z*`` ``(B, *state_shape)``.
    """

    def __init__(self, f: nn.Module, *, noise: float, noise_time: float = 1.0,
                 noise_dt: float = 0.1, **kwargs: Any) -> None:
        modifier = Noise(noise, noise_time, noise_dt)
        super().__init__(f, modifiers=(*kwargs.pop("modifiers", ()), modifier), **kwargs)
        self.noise, self.noise_time, self.noise_dt = modifier.sigma, modifier.time, modifier.dt

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, noise={self.noise:g}, noise_time={self.noise_time:g}, "
                f"noise_dt={self.noise_dt:g}")
