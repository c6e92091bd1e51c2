"""contdeq: continuous deep equilibrium models on PyTorch."""

from . import robust, solvers
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .data import PROCEDURAL_CLASSES, procedural_images
from .implicit import BackwardConfig, DEQStats, ForwardSolver, equilibrium
from .nn import (
    DEQ,
    ICNN,
    LyapunovDEQ,
    LyapunovFunction,
    MultiScaleCell,
    MultiScaleDEQ,
    MultiScaleFusion,
    MultiScaleNeuralODE,
    MultiScaleSkipDEQ,
    MultiScaleSkipRegDEQ,
    NeuralODE,
    NeuralSDE,
    NoisyDEQ,
    ResidualBlock,
    SkipDEQ,
    SkipRegDEQ,
    SpectralNormCap,
    spectral_norm_cap,
    update_normalization,
    weight_norm,
)
from .regularizers import aux_loss, jacobian_frobenius, skip_loss

__version__ = "0.1.0.dev0"

__all__ = [
    "DEQ",
    "ICNN",
    "PROCEDURAL_CLASSES",
    "BackwardConfig",
    "Checkpoint",
    "DEQStats",
    "ForwardSolver",
    "LyapunovDEQ",
    "LyapunovFunction",
    "MultiScaleCell",
    "MultiScaleDEQ",
    "MultiScaleFusion",
    "MultiScaleNeuralODE",
    "MultiScaleSkipDEQ",
    "MultiScaleSkipRegDEQ",
    "NeuralODE",
    "NeuralSDE",
    "NoisyDEQ",
    "ResidualBlock",
    "SkipDEQ",
    "SkipRegDEQ",
    "SpectralNormCap",
    "aux_loss",
    "equilibrium",
    "jacobian_frobenius",
    "load_checkpoint",
    "procedural_images",
    "robust",
    "save_checkpoint",
    "skip_loss",
    "solvers",
    "spectral_norm_cap",
    "update_normalization",
    "weight_norm",
]
