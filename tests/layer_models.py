"""Small modules ``f(z, x)`` and predictors shared by the layer tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import contdeq


class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + U x + b)`` with ``||W||_2 <= lipschitz`` at construction."""

    def __init__(self, width: int, in_features: int, lipschitz: float = 0.5,
                 dtype: torch.dtype = torch.float64, cap: float | None = None) -> None:
        super().__init__()
        self.W = nn.Linear(width, width, bias=False, dtype=dtype)
        self.U = nn.Linear(in_features, width, dtype=dtype)
        with torch.no_grad():
            self.W.weight.mul_(lipschitz / torch.linalg.matrix_norm(self.W.weight, ord=2))
        if cap is not None:
            contdeq.spectral_norm_cap(self.W, cap=cap)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.W(z) + self.U(x))


def tanh_cell_like_x(width: int, dtype: torch.dtype = torch.float64) -> TanhCell:
    """A cell whose state has ``x``'s shape (``state_shape`` may be left out)."""
    return TanhCell(width, width, dtype=dtype)
