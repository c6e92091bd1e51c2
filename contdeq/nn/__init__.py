"""``nn.Module`` layers: equilibrium layers, a neural ODE baseline, weight normalizations."""

from .deq import DEQ, SkipDEQ, SkipRegDEQ
from .node import NeuralODE
from .normalization import SpectralNormCap, spectral_norm_cap, update_normalization, weight_norm

__all__ = [
    "DEQ",
    "NeuralODE",
    "SkipDEQ",
    "SkipRegDEQ",
    "SpectralNormCap",
    "spectral_norm_cap",
    "update_normalization",
    "weight_norm",
]
