"""Butcher tableaux: order conditions, checks at construction, equality with torchdiffeq's,
observed convergence order, and a new tableau registered end to end."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torchdiffeq._impl.adaptive_heun import _ADAPTIVE_HEUN_TABLEAU
from torchdiffeq._impl.bosh3 import _BOGACKI_SHAMPINE_TABLEAU
from torchdiffeq._impl.dopri5 import _DORMAND_PRINCE_SHAMPINE_TABLEAU
from torchdiffeq._impl.dopri8 import _DOPRI8_TABLEAU

import contdeq
from contdeq.solvers import STEADY_STATE_METHODS, steady_state
from contdeq.solvers.rk import RungeKuttaStepper
from contdeq.solvers.tableaux import TABLEAUX, Tableau

from .layer_models import TanhCell

TORCHDIFFEQ_TABLEAUX = {"dopri5": _DORMAND_PRINCE_SHAMPINE_TABLEAU,
                        "bosh3": _BOGACKI_SHAMPINE_TABLEAU, "dopri8": _DOPRI8_TABLEAU,
                        "adaptive_heun": _ADAPTIVE_HEUN_TABLEAU}


def _arrays(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tab = TABLEAUX[name]
    s = len(tab.c_sol)
    a = np.zeros((s, s))
    c = np.zeros(s)
    for i, row in enumerate(tab.beta):
        a[i + 1, : len(row)] = row
        c[i + 1] = tab.alpha[i]
    return a, c, np.array(tab.c_sol), np.array(tab.c_error)


@pytest.mark.parametrize("name", [n for n, t in TABLEAUX.items() if t.order >= 5])
def test_order_conditions_up_to_five(name: str) -> None:
    """All nine conditions of order <= 4 plus one of order 5, in matrix form (independent of
    Tableau.order_defects)."""
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


@pytest.mark.parametrize("name", list(TORCHDIFFEQ_TABLEAUX))
def test_tableaux_equal_torchdiffeqs(name: str) -> None:
    """contdeq's written-out coefficients are exactly torchdiffeq's (whose solvers the
    "torchdiffeq"/"event" backends and NeuralODE run): a mistyped coefficient fails here."""
    ours, theirs = TABLEAUX[name], TORCHDIFFEQ_TABLEAUX[name]
    assert ours.alpha == tuple(theirs.alpha.tolist())
    assert ours.beta == tuple(tuple(row.tolist()) for row in theirs.beta)
    assert ours.c_sol == tuple(theirs.c_sol.tolist())
    assert ours.c_error == tuple(theirs.c_error.tolist())


def test_dopri8_takes_thirteen_evaluations_per_step() -> None:
    """Prince & Dormand's RK8(7)13M: 13 stages, the FSAL one reused (docs once said 12)."""
    assert TABLEAUX["dopri8"].evaluations_per_step == 13 and TABLEAUX["dopri8"].fsal


def _with_row(tab: Tableau, i: int, row: tuple[float, ...]) -> dict:
    return {"beta": tuple(row if k == i else r for k, r in enumerate(tab.beta))}


DOPRI5 = TABLEAUX["dopri5"]
WRONG = {
    # column 0 of A (k_0's weight in stage 3): no order condition sees it, the row sum does
    "column 0 of A": (_with_row(DOPRI5, 2, (DOPRI5.beta[2][0] + 1e-6, *DOPRI5.beta[2][1:])),
                      "beta\\[2\\] sums to"),
    # the same row sum, coefficients moved between columns 0 and 1: b A c = 1/6 fails
    "row sum kept": (_with_row(DOPRI5, 3, (DOPRI5.beta[3][0] + 1e-3,
                                           DOPRI5.beta[3][1] - 1e-3, *DOPRI5.beta[3][2:])),
                     "c_sol violates the order condition b A\\^1 c\\^1"),
    "weights": ({"c_sol": (DOPRI5.c_sol[0] + 1e-6, *DOPRI5.c_sol[1:])},
                "c_sol violates the order condition sum\\(b\\) = 1"),
    "error weights": ({"c_error": (*DOPRI5.c_error[:-1], DOPRI5.c_error[-1] + 1e-6)},
                      "c_error must sum to 0"),
    "order overclaimed": ({"order": 6}, "order 6 claimed"),
    "lengths": ({"c_error": DOPRI5.c_error[:-1]}, "lengths must be"),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_tableau_is_refused(case: str) -> None:
    """A tableau with a wrong coefficient, weight, length or claimed order raises at
    construction, naming the failed check."""
    change, message = WRONG[case]
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(DOPRI5, **change)


@pytest.fixture
def ralston() -> Iterator[str]:
    """Ralston's second-order method with Euler embedded (a pair contdeq does not ship),
    registered for one test."""
    tableau = Tableau(name="ralston", order=2, alpha=(2 / 3,), beta=((2 / 3,),),
                      c_sol=(1 / 4, 3 / 4), c_error=(1 / 4 - 1.0, 3 / 4))
    TABLEAUX.register("ralston", tableau)
    try:
        yield "ralston"
    finally:
        TABLEAUX.unregister("ralston")


def test_new_tableau_is_one_registration(ralston: str) -> None:
    """A registered tableau is a steady_state method and a layer option at once (validation
    reads the registry), and it solves: its steady state is the fixed point."""
    assert ralston in STEADY_STATE_METHODS
    # A second-order pair needs small steps for tight tolerances: 1e-3 keeps this fast.
    z, stats = steady_state(lambda t, z: torch.tanh(0.5 * z + 1) - z,
                            torch.zeros(3, 2, dtype=torch.float64), method=ralston,
                            atol=1e-3, rtol=0.0, max_steps=2000)
    assert stats.all_converged and stats.method == ralston
    torch.testing.assert_close(torch.tanh(0.5 * z + 1), z, atol=1e-3, rtol=0)
    layer = contdeq.DEQ(TanhCell(4, 3), method=ralston, state_shape=4, atol=1e-3, rtol=1e-3,
                        max_steps=2000)
    with torch.no_grad():
        layer(torch.randn(2, 3, dtype=torch.float64))
    assert layer.stats.forward.all_converged and layer.stats.forward.method == ralston
