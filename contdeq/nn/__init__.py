"""``nn.Module`` layers: the equilibrium layer composed of small objects (initial-state
policies, state structures, dynamics modifiers) and its short names (skip, multi-scale,
Lyapunov-stable), neural ODE and SDE baselines, weight-tied unrolled layers, building blocks of
multi-scale cells, weight normalizations."""

import warnings
from typing import Any

from .blocks import MultiScaleCell, MultiScaleFusion, ResidualBlock
from .deq import DEQ, INITIAL_STATES, InitialState, Single, Zeros
from .init import FZero, Input, Predictor
from .lyapunov import ICNN, LyapunovDEQ, LyapunovFunction, LyapunovProjection
from .modifiers import MODIFIERS, Modifier
from .multiscale import MultiScaleDEQ, MultiScaleNeuralODE, MultiScaleSkipDEQ, MultiScaleSkipRegDEQ
from .node import NeuralODE
from .noisy import Noise
from .normalization import SpectralNormCap, spectral_norm_cap, update_normalization, weight_norm
from .sde import NeuralSDE
from .skip import SkipDEQ, SkipRegDEQ
from .structure import Scales, Structure
from .weight_tied import MultiScaleWeightTied, WeightTied

__all__ = [
    "DEQ",
    "ICNN",
    "INITIAL_STATES",
    "MODIFIERS",
    "FZero",
    "InitialState",
    "Input",
    "LyapunovDEQ",
    "LyapunovFunction",
    "LyapunovProjection",
    "Modifier",
    "MultiScaleCell",
    "MultiScaleDEQ",
    "MultiScaleFusion",
    "MultiScaleNeuralODE",
    "MultiScaleSkipDEQ",
    "MultiScaleSkipRegDEQ",
    "MultiScaleWeightTied",
    "NeuralODE",
    "NeuralSDE",
    "Noise",
    "Predictor",
    "ResidualBlock",
    "Scales",
    "Single",
    "SkipDEQ",
    "SkipRegDEQ",
    "SpectralNormCap",
    "Structure",
    "WeightTied",
    "Zeros",
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
