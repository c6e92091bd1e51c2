"""``nn.Module`` layers: equilibrium layers (single- and multi-scale), a neural ODE baseline,
weight-tied unrolled layers, building blocks of multi-scale cells, weight normalizations."""

from .blocks import MultiScaleCell, MultiScaleFusion, ResidualBlock
from .deq import DEQ, SkipDEQ, SkipRegDEQ
from .multiscale import MultiScaleDEQ, MultiScaleNeuralODE, MultiScaleSkipDEQ, MultiScaleSkipRegDEQ
from .node import NeuralODE
from .normalization import SpectralNormCap, spectral_norm_cap, update_normalization, weight_norm
from .weight_tied import MultiScaleWeightTied, WeightTied

__all__ = [
    "DEQ",
    "MultiScaleCell",
    "MultiScaleDEQ",
    "MultiScaleFusion",
    "MultiScaleNeuralODE",
    "MultiScaleSkipDEQ",
    "MultiScaleSkipRegDEQ",
    "MultiScaleWeightTied",
    "NeuralODE",
    "ResidualBlock",
    "SkipDEQ",
    "SkipRegDEQ",
    "SpectralNormCap",
    "WeightTied",
    "spectral_norm_cap",
    "update_normalization",
    "weight_norm",
]
