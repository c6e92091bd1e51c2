"""contdeq: continuous deep equilibrium models on PyTorch."""

from . import jiio, robust, solvers
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .data import PROCEDURAL_CLASSES, procedural_images
from .implicit import (
    JFB,
    BackwardConfig,
    BackwardMode,
    DEQStats,
    DoubleBackwardError,
    ForwardSolver,
    Implicit,
    Phantom,
    Unrolled,
    WarmImplicit,
    backward_mode,
    equilibrium,
)
from .jiio import joint_inference
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
    MultiScaleWeightTied,
    NeuralODE,
    NeuralSDE,
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
    "ICNN",
    "JFB",
    "PROCEDURAL_CLASSES",
    "BackwardConfig",
    "BackwardMode",
    "Checkpoint",
    "CheckpointError",
    "DEQStats",
    "DoubleBackwardError",
    "ForwardSolver",
    "Implicit",
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
    "Phantom",
    "ResidualBlock",
    "SkipDEQ",
    "SkipRegDEQ",
    "SpectralNormCap",
    "Unrolled",
    "WarmImplicit",
    "WeightTied",
    "aux_loss",
    "backward_mode",
    "equilibrium",
    "jacobian_frobenius",
    "jiio",
    "joint_inference",
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


def __getattr__(name: str) -> object:
    """``NoisyDEQ``, deprecated: warns (``DeprecationWarning``) and returns it."""
    if name == "NoisyDEQ":
        import warnings

        from .nn.noisy import DEPRECATION, NoisyDEQ

        warnings.warn(DEPRECATION, DeprecationWarning, stacklevel=2)
        return NoisyDEQ
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
