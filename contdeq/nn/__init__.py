"""``nn.Module`` layers: equilibrium layers (single- and multi-scale, Lyapunov-stable),
neural ODE and SDE baselines, weight-tied unrolled layers, building blocks of multi-scale
cells, weight normalizations."""

import warnings
from typing import Any

from .blocks import MultiScaleCell, MultiScaleFusion, ResidualBlock
from .deq import DEQ, SkipDEQ, SkipRegDEQ
from .lyapunov import ICNN, LyapunovDEQ, LyapunovFunction
from .multiscale import MultiScaleDEQ, MultiScaleNeuralODE, MultiScaleSkipDEQ, MultiScaleSkipRegDEQ
from .node import NeuralODE
from .normalization import SpectralNormCap, spectral_norm_cap, update_normalization, weight_norm
from .sde import NeuralSDE
from .weight_tied import MultiScaleWeightTied, WeightTied

__all__ = [
    "DEQ",
    "ICNN",
    "LyapunovDEQ",
    "LyapunovFunction",
    "MultiScaleCell",
    "MultiScaleDEQ",
    "MultiScaleFusion",
    "MultiScaleNeuralODE",
    "MultiScaleSkipDEQ",
    "MultiScaleSkipRegDEQ",
    "MultiScaleWeightTied",
    "NeuralODE",
    "NeuralSDE",
    "ResidualBlock",
    "SkipDEQ",
    "SkipRegDEQ",
    "SpectralNormCap",
    "WeightTied",
    "spectral_norm_cap",
    "update_normalization",
    "weight_norm",
]


def __getattr__(name: str) -> Any:
    """``NoisyDEQ``, deprecated: warns (``DeprecationWarning``) and returns it."""
    if name == "NoisyDEQ":
        from .noisy import DEPRECATION, NoisyDEQ

        warnings.warn(DEPRECATION, DeprecationWarning, stacklevel=2)
        return NoisyDEQ
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
