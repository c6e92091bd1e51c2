"""``nn.Module`` layers: equilibrium layers (single- and multi-scale, Lyapunov-stable,
noise-injected), neural ODE and SDE baselines, weight-tied unrolled layers, building blocks of
multi-scale cells, weight normalizations."""

from .blocks import MultiScaleCell, MultiScaleFusion, ResidualBlock
from .deq import DEQ, SkipDEQ, SkipRegDEQ
from .lyapunov import ICNN, LyapunovDEQ, LyapunovFunction
from .multiscale import MultiScaleDEQ, MultiScaleNeuralODE, MultiScaleSkipDEQ, MultiScaleSkipRegDEQ
from .node import NeuralODE
from .noisy import NoisyDEQ
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
    "NoisyDEQ",
    "ResidualBlock",
    "SkipDEQ",
    "SkipRegDEQ",
    "SpectralNormCap",
    "WeightTied",
    "spectral_norm_cap",
    "update_normalization",
    "weight_norm",
]
