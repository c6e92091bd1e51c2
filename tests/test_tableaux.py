"""Butcher tableaux: order conditions and observed convergence order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contdeq.solvers.rk import RungeKuttaStepper
from contdeq.solvers.tableaux import TABLEAUX


def _arrays(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tab = TABLEAUX[name]
    s = len(tab.c_sol)
    a = np.zeros((s, s))
    c = np.zeros(s)
    for i, row in enumerate(tab.beta):
        a[i + 1, : len(row)] = row
        c[i + 1] = tab.alpha[i]
    return a, c, np.array(tab.c_sol), np.array(tab.c_error)


@pytest.mark.parametrize("name", ["dopri5", "tsit5", "dopri8"])
def test_order_conditions_up_to_five(name: str) -> None:
    a, c, b, e = _arrays(name)
    assert np.allclose(a.sum(1), c)
    conditions = [(b.sum(), 1.0), (b @ c, 1 / 2), (b @ c**2, 1 / 3), (b @ a @ c, 1 / 6),
                  (b @ c**3, 1 / 4), (b @ (c * (a @ c)), 1 / 8), (b @ a @ c**2, 1 / 12),
                  (b @ a @ a @ c, 1 / 24), (b @ c**4, 1 / 5)]
    for got, want in conditions:
        assert got == pytest.approx(want, abs=1e-12)
    assert e.sum() == pytest.approx(0.0, abs=1e-12)  # the embedded pair is consistent too


def _pendulum(t: float, z: torch.Tensor) -> torch.Tensor:
    return torch.stack([z[:, 1], -torch.sin(z[:, 0])], dim=1)


def _integrate(name: str, n: int, t_end: float = 2.0) -> torch.Tensor:
    stepper = RungeKuttaStepper(TABLEAUX[name])
    h = t_end / n
    z = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    for i in range(n):
        z, _, _ = stepper.step(_pendulum, i * h, z, _pendulum(i * h, z), h, None)
    return z


@pytest.mark.parametrize(("name", "order"), [("dopri5", 5), ("tsit5", 5), ("bosh3", 3),
                                              ("adaptive_heun", 2)])
def test_observed_convergence_order(name: str, order: int) -> None:
    """Fixed steps on the pendulum: halving h divides the error by about 2^order."""
    reference = _integrate("dopri8", 400)
    errs = [float((_integrate(name, n) - reference).abs().max()) for n in (20, 40)]
    observed = np.log2(errs[0] / errs[1])
    assert observed == pytest.approx(order, abs=0.4)
