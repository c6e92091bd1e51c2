"""Fuzz suite: random maps, shapes, dtypes, solvers and policies end with a clear outcome.

The problems and the contract are in :mod:`tests.fuzz_cases` (run it as a script for the
outcome counts over thousands of cases); here hypothesis draws them reproducibly.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import contdeq
from contdeq.implicit import BACKWARD_METHODS, FORWARD_SOLVERS
from contdeq.solvers import (
    ConvergenceError,
    ConvergenceWarning,
    NonFiniteError,
    fixed_point,
    steady_state,
)

from .fuzz_cases import (
    DTYPES,
    FAMILIES,
    LAYOUTS,
    OUTCOMES,
    POLICIES,
    SHAPES,
    SOLVERS,
    Case,
    report,
    run_case,
)


def fuzz(max_examples: int) -> settings:
    """Reproducible hypothesis settings: derandomized, no example database, no deadline."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

cases = st.builds(
    Case,
    seed=st.integers(0, 2**31 - 1),
    family=st.sampled_from(FAMILIES),
    solver=st.sampled_from(SOLVERS),
    shape=st.sampled_from(SHAPES),
    dtype=st.sampled_from(tuple(DTYPES)),
    max_steps=st.integers(1, 60),
    policy=st.sampled_from(POLICIES),
    strength=st.floats(0.0, 1.0),
    finite_t_max=st.booleans(),
    layout=st.sampled_from(LAYOUTS),
)


@fuzz(250)
@given(cases)
def test_random_solves_end_with_a_clear_outcome(case: Case) -> None:
    assert run_case(case) in OUTCOMES


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_on_every_solver(family: str) -> None:
    """A fixed sweep, so each (family, solver) pair is exercised whatever hypothesis draws;
    catches a false convergence claim (re-checked in float64), a silent NaN or a hang."""
    for i, solver in enumerate(SOLVERS):
        case = Case(seed=i, family=family, solver=solver, shape=(2, 3),
                    dtype=("float64", "float32")[i % 2], max_steps=40, policy="ignore",
                    strength=0.5, finite_t_max=i % 2 == 0, layout=LAYOUTS[i % len(LAYOUTS)])
        assert run_case(case) in OUTCOMES


@pytest.mark.slow
def test_ten_thousand_random_solves() -> None:
    """10,000 random problems (every family, solver, backend, dtype and layout): no hang, no
    silent NaN, no false convergence claim, no other contract violation."""
    counts = report(10_000, seed=0, hang_after=120.0)
    assert counts["hang"] == 0 and counts["violation"] == 0, counts


def test_poisoned_solves_raise() -> None:
    """NaN from the second call on, while samples still iterate: always NonFiniteError."""
    for solver in SOLVERS:
        case = Case(seed=1, family="nan_midway", solver=solver, shape=(3, 4),
                    dtype="float32", max_steps=50, policy="raise", strength=0.9,
                    finite_t_max=False)
        assert run_case(case) == "raised_nonfinite", solver


def test_poison_in_a_rejected_last_step_is_not_silent() -> None:
    """NaN from the second call with one step allowed: a rejected step must still raise (found
    by hypothesis for the torchdiffeq-loop backend, whose NaN step size only failed one step
    later)."""
    for solver in SOLVERS:
        case = Case(seed=0, family="nan_midway", solver=solver, shape=(3,), dtype="float64",
                    max_steps=1, policy="ignore", strength=0.0, finite_t_max=False)
        assert run_case(case) in OUTCOMES, solver


class _Cell(nn.Module):
    """``f(z, x) = tanh(W z + U x)`` with ``||W||_2 = radius``."""

    def __init__(self, width: int, radius: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.W = nn.Linear(width, width, bias=False, dtype=dtype)
        self.U = nn.Linear(width, width, dtype=dtype)
        with torch.no_grad():
            self.W.weight.mul_(radius / torch.linalg.matrix_norm(self.W.weight, ord=2))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.W(z) + self.U(x))


def _layer(kind: str, cell: _Cell, width: int, options: dict) -> nn.Module:
    if kind == "SkipDEQ":
        predictor = nn.Linear(width, width, dtype=cell.W.weight.dtype)
        return contdeq.SkipDEQ(cell, predictor, **options)
    return getattr(contdeq, kind)(cell, **options)


@fuzz(40)
@given(
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["DEQ", "SkipDEQ", "SkipRegDEQ"]),
    solver=st.sampled_from(list(FORWARD_SOLVERS)),
    backward_method=st.sampled_from(list(BACKWARD_METHODS)),
    radius=st.floats(0.1, 3.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    policy=st.sampled_from(POLICIES),
)
def test_random_layers_train_or_fail_loudly(seed: int, kind: str, solver: str,
                                             backward_method: str, radius: float,
                                             dtype: torch.dtype, policy: str) -> None:
    """Forward and backward through a layer with a random (possibly expansive) ``f``."""
    torch.manual_seed(seed)
    width = 6
    options = {"solver": solver, "backward_method": backward_method, "max_steps": 40,
               "backward_max_steps": 40, "on_nonconvergence": policy, "timeout": 30.0}
    layer = _layer(kind, _Cell(width, radius, dtype), width, options)
    x = torch.randn(4, width, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            z = layer(x)
            (z.square().mean() + contdeq.aux_loss(layer)).backward()
        except (NonFiniteError, ConvergenceError) as exc:
            assert policy == "raise" or isinstance(exc, NonFiniteError)
            return
    stats = layer.stats
    solves = [s for s in (stats.forward, stats.backward) if s is not None]
    for s in solves:
        assert torch.equal(s.converged, s.residual <= s.tolerance)
        assert s.steps <= 40 and bool(torch.isfinite(s.residual).all())
    assert bool(torch.isfinite(z).all())
    for p in layer.parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all())
    warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    reported = not all(s.all_converged for s in solves)
    assert warned == (policy == "warn" and reported)
    assert policy != "raise" or not reported



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("solver", ["dopri5", "ptc", "dopri5[torchdiffeq]"])
def test_t_max_is_reached_in_low_precision(dtype: torch.dtype, solver: str) -> None:
    """Regression: the pseudo-time summed in float32/half stalled short of ``t_max`` (a bogus
    NonFiniteError or a run to ``max_steps``); torchdiffeq's loop stepped past it."""
    m = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0] * 0.99
    c = torch.randn(4, 8)
    method, _, backend = solver.partition("[")
    _, stats = steady_state(lambda t, z: z @ m.T.to(dtype) + c.to(dtype) - z,
                            torch.zeros(4, 8, dtype=dtype), method=method,
                            backend=backend.rstrip("]") or "lean", atol=1e-2, rtol=0.0,
                            t_max=3.3, max_steps=500, on_nonconvergence="ignore")
    assert stats.stop_reason == "t_max"
    assert stats.t_final is not None
    assert float(stats.t_final.max()) <= 3.3 * (1 + 2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_anderson_in_half_precision(dtype: torch.dtype) -> None:
    """Regression: torch.linalg.solve has no half-precision CPU kernel (NotImplementedError)."""
    m = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0].to(dtype) * 0.5
    c = torch.randn(4, 8).to(dtype)
    _, stats = fixed_point(lambda z: z @ m.T + c, torch.zeros(4, 8, dtype=dtype),
                           atol=5e-2, rtol=5e-2)
    assert stats.all_converged


def test_anderson_survives_an_overflowing_gram_matrix() -> None:
    """Regression: residuals near float32's range made the mixing system singular and
    crashed with LinAlgError; now the solve ends with NonFiniteError or a report."""
    with pytest.raises(NonFiniteError):
        fixed_point(lambda z: 1e6 * z + 1.0, torch.zeros(2, 4), max_steps=50)
