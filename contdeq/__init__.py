"""contdeq: continuous deep equilibrium models on PyTorch."""

from . import solvers

__version__ = "0.1.0.dev0"

__all__ = ["solvers"]
