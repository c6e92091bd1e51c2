"""contdeq: continuous deep equilibrium models on PyTorch."""

from . import jiio, solvers
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .data import PROCEDURAL_CLASSES, procedural_images
from .implicit import BackwardConfig, DEQStats, ForwardSolver, equilibrium
from .jiio import joint_inference
from .nn import (
    DEQ,
    MultiScaleCell,
    MultiScaleDEQ,
    MultiScaleFusion,
    MultiScaleNeuralODE,
    MultiScaleSkipDEQ,
    MultiScaleSkipRegDEQ,
    NeuralODE,
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
    "PROCEDURAL_CLASSES",
    "BackwardConfig",
    "Checkpoint",
    "DEQStats",
    "ForwardSolver",
    "MultiScaleCell",
    "MultiScaleDEQ",
    "MultiScaleFusion",
    "MultiScaleNeuralODE",
    "MultiScaleSkipDEQ",
    "MultiScaleSkipRegDEQ",
    "NeuralODE",
    "ResidualBlock",
    "SkipDEQ",
    "SkipRegDEQ",
    "SpectralNormCap",
    "aux_loss",
    "equilibrium",
    "jacobian_frobenius",
    "jiio",
    "joint_inference",
    "load_checkpoint",
    "procedural_images",
    "save_checkpoint",
    "skip_loss",
    "solvers",
    "spectral_norm_cap",
    "update_normalization",
    "weight_norm",
]
