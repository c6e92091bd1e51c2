"""contdeq: continuous deep equilibrium models on PyTorch."""

from . import solvers
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .implicit import BackwardConfig, DEQStats, ForwardSolver, equilibrium
from .nn import (
    DEQ,
    NeuralODE,
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
    "BackwardConfig",
    "Checkpoint",
    "DEQStats",
    "ForwardSolver",
    "NeuralODE",
    "SkipDEQ",
    "SkipRegDEQ",
    "SpectralNormCap",
    "aux_loss",
    "equilibrium",
    "jacobian_frobenius",
    "load_checkpoint",
    "save_checkpoint",
    "skip_loss",
    "solvers",
    "spectral_norm_cap",
    "update_normalization",
    "weight_norm",
]
