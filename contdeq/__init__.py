"""contdeq: continuous deep equilibrium models on PyTorch."""

from . import solvers
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .data import PROCEDURAL_CLASSES, procedural_images
from .implicit import (
    JFB,
    BackwardConfig,
    BackwardMode,
    DEQStats,
    ForwardSolver,
    Implicit,
    Unrolled,
    equilibrium,
)
from .nn import (
    DEQ,
    MultiScaleCell,
    MultiScaleDEQ,
    MultiScaleFusion,
    MultiScaleNeuralODE,
    MultiScaleSkipDEQ,
    MultiScaleSkipRegDEQ,
    MultiScaleWeightTied,
    NeuralODE,
    ResidualBlock,
    SkipDEQ,
    SkipRegDEQ,
    SpectralNormCap,
    WeightTied,
    spectral_norm_cap,
    update_normalization,
    weight_norm,
)
from .regularizers import aux_loss, jacobian_frobenius, skip_loss

__version__ = "0.1.0.dev0"

__all__ = [
    "DEQ",
    "JFB",
    "PROCEDURAL_CLASSES",
    "BackwardConfig",
    "BackwardMode",
    "Checkpoint",
    "CheckpointError",
    "DEQStats",
    "ForwardSolver",
    "Implicit",
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
    "Unrolled",
    "WeightTied",
    "aux_loss",
    "equilibrium",
    "jacobian_frobenius",
    "load_checkpoint",
    "procedural_images",
    "save_checkpoint",
    "skip_loss",
    "solvers",
    "spectral_norm_cap",
    "update_normalization",
    "weight_norm",
]
