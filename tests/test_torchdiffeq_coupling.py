"""Fails loudly if the torchdiffeq internals that contdeq relies on change."""

from __future__ import annotations

import inspect

import torch
import torchdiffeq
from torchdiffeq._impl import misc, rk_common
from torchdiffeq._impl.odeint import SOLVERS

from contdeq.solvers.tableaux import TABLEAUX
from contdeq.solvers.torchdiffeq_backend import EVENT_METHODS, TORCHDIFFEQ_FSAL_METHODS


def test_version_is_the_pinned_series() -> None:
    assert torchdiffeq.__version__.startswith("0.2.")


def test_runge_kutta_internals_exist_with_expected_shapes() -> None:
    assert rk_common._RungeKuttaState._fields == ("y1", "f1", "t0", "t1", "dt", "interp_coeff")
    assert rk_common._ButcherTableau._fields == ("alpha", "beta", "c_sol", "c_error")
    params = inspect.signature(rk_common.RKAdaptiveStepsizeODESolver.__init__).parameters
    for name in ("func", "y0", "rtol", "atol", "first_step", "max_step", "norm"):
        assert name in params or "kwargs" in params, name
    for method in (*TORCHDIFFEQ_FSAL_METHODS, *EVENT_METHODS):
        solver = SOLVERS[method]
        assert hasattr(solver, "_adaptive_step") and hasattr(solver, "_before_integrate")
    assert callable(misc._PerturbFunc) and misc._all_callback_names


def test_fsal_methods_return_the_derivative_at_the_new_state() -> None:
    """The torchdiffeq backend stops on rk_state.f1: it must equal f(y1)."""

    def func(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cos(y) - y

    y0 = torch.zeros(2, 3, dtype=torch.float64)
    for method in TORCHDIFFEQ_FSAL_METHODS:
        perturbed = misc._PerturbFunc(func)
        for name in misc._all_callback_names:
            setattr(perturbed, name, misc._null_callback)
        solver = SOLVERS[method](func=perturbed, y0=y0, rtol=1e-6, atol=1e-6, first_step=0.1,
                                 norm=misc._rms_norm)
        solver._before_integrate(torch.tensor([0.0, 1.0], dtype=torch.float64))
        state = solver._adaptive_step(solver.rk_state)
        assert torch.allclose(state.f1, func(state.t1, state.y1), atol=1e-14)


def test_tableaux_are_fsal_where_expected() -> None:
    """The torchdiffeq backend stops on the FSAL derivative: its methods must be FSAL
    (contdeq's tableaux equal torchdiffeq's, tests/test_tableaux.py)."""
    for method in TORCHDIFFEQ_FSAL_METHODS:
        assert TABLEAUX[method].fsal
    assert not TABLEAUX["adaptive_heun"].fsal
