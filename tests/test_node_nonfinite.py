"""A NeuralODE whose ``f`` returns NaN reports it as such, not as a step-size failure."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import contdeq
from contdeq.solvers import NonFiniteError


class NaNAfter(nn.Module):
    """``tanh(z + x)`` for the first ``calls`` calls, then NaN."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls
        self.seen = 0

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        self.seen += 1
        out = torch.tanh(z + x)
        return out * float("nan") if self.seen > self.calls else out


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_nan_inside_f_raises_nonfinite_error(method: str) -> None:
    """Catches a NaN in ``f`` reported as ``ConvergenceError: ... underflow in dt 0.0`` (the
    adaptive step shrinks on a NaN error estimate until torchdiffeq gives up)."""
    f = NaNAfter(calls=5)
    node = contdeq.NeuralODE(f, method=method)
    with pytest.raises(NonFiniteError, match="f returned NaN or Inf at f call") as info:
        node(torch.randn(2, 3))
    assert info.value.step == f.seen > 5


def test_a_finite_step_limit_stays_a_convergence_error() -> None:
    """Catches the NaN check swallowing a genuine step limit (finite but too many steps)."""

    class Stiff(nn.Module):
        def forward(self, z: Tensor, x: Tensor) -> Tensor:
            return -1e4 * z + x

    with pytest.raises(contdeq.solvers.ConvergenceError, match="did not reach t_end"):
        contdeq.NeuralODE(Stiff(), t_end=10.0, max_steps=20)(torch.randn(3, 2))
