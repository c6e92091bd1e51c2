"""Non-convergence reporting, non-finite values and argument validation."""

from __future__ import annotations

import math

import pytest
import torch

from contdeq.solvers import (
    ConvergenceError,
    ConvergenceWarning,
    NonFiniteError,
    fixed_point,
    steady_state,
)

EXPANSIVE_ODE = lambda t, z: 0.5 * z + 1.0  # noqa: E731  (dz/dt = f - z with f = 1.5 z + 1)
NO_FIXED_POINT = lambda z: z + 1.0  # noqa: E731  (residual 1 everywhere)
SOLVES = {
    "steady_state": lambda func, z0, **kw: steady_state(lambda t, z: func(z) - z, z0, **kw),
    "steady_state_ptc": lambda func, z0, **kw: steady_state(
        lambda t, z: func(z) - z, z0, method="ptc", **kw),
    "fixed_point": lambda func, z0, **kw: fixed_point(func, z0, **kw),
}


@pytest.mark.parametrize("solve", SOLVES)
def test_nonconvergence_warns_by_default(solve: str) -> None:
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        _, stats = SOLVES[solve](NO_FIXED_POINT, torch.zeros(2, 3), max_steps=3)
    assert not stats.all_converged
    assert stats.stop_reason == "max_steps"
    assert torch.equal(stats.converged, stats.residual <= stats.tolerance)


@pytest.mark.parametrize("solve", SOLVES)
def test_nonconvergence_raises_with_stats(solve: str) -> None:
    with pytest.raises(ConvergenceError) as info:
        SOLVES[solve](NO_FIXED_POINT, torch.zeros(2, 3), max_steps=3,
                      on_nonconvergence="raise")
    assert info.value.stats.steps == 3


@pytest.mark.parametrize("solve", SOLVES)
def test_nonconvergence_ignored_when_asked(solve: str, recwarn: pytest.WarningsRecorder) -> None:
    _, stats = SOLVES[solve](NO_FIXED_POINT, torch.zeros(2, 3), max_steps=3,
                             on_nonconvergence="ignore")
    assert not stats.all_converged
    assert not [w for w in recwarn if issubclass(w.category, ConvergenceWarning)]


def test_steady_state_of_expansive_dynamics_is_reported() -> None:
    """dz/dt = 0.5 z + 1 runs away from 0 (its residual only grows; float32 does not overflow
    within 200 steps): the solve stops at max_steps, unconverged, and returns each sample's
    best state, z0 with residual rms(1) = 1. Catches a runaway claimed converged, a limit not
    enforced, or the last (worst) iterate returned instead of the best."""
    z, stats = steady_state(EXPANSIVE_ODE, torch.zeros(2, 3), max_steps=200,
                            on_nonconvergence="ignore")
    assert stats.stop_reason == "max_steps" and stats.steps == 200
    assert not stats.converged.any()
    assert torch.equal(z, torch.zeros(2, 3))
    assert stats.residual.tolist() == [1.0, 1.0]
    assert float(stats.t_final.min()) > 50.0  # it did integrate, far from the start


#: The step each solve reports when the 4th call of func turns NaN: the fixed-point loop's
#: 3rd iteration; ptc after 2 finite steps plus MAX_NONFINITE_TRIALS = 30 shrinking trials;
#: dopri5, whose first step already evaluates the 4th call, after 30 trials.
NAN_STEP = {"steady_state": 30, "steady_state_ptc": 32, "fixed_point": 3}


@pytest.mark.parametrize("solve", SOLVES)
def test_nan_producing_function_raises_with_step(solve: str) -> None:
    """NaN from the 4th call on raises NonFiniteError naming the exact solver step (worked out
    above): catches a NaN accepted as a step, a wrong trial limit, or a wrong step count."""
    calls = []

    def func(z: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        out = torch.tanh(0.5 * z) + 1.0
        return out if len(calls) < 4 else out * math.nan

    with pytest.raises(NonFiniteError, match="step") as info:
        SOLVES[solve](func, torch.zeros(2, 3), atol=1e-12, rtol=0.0)
    assert info.value.step == NAN_STEP[solve]


def test_t_max_stops_the_solve() -> None:
    _, stats = steady_state(lambda t, z: 0.01 * (1.0 - z), torch.zeros(1, 2), t_max=1.0,
                            on_nonconvergence="ignore")
    assert stats.stop_reason == "t_max"
    assert stats.t_final is not None and abs(float(stats.t_final.max()) - 1.0) < 1e-9


def test_timeout_stops_the_solve() -> None:
    _, stats = steady_state(lambda t, z: 0.5 * z + 1.0, torch.zeros(1, 2), method="ptc",
                            timeout=1e-9, on_nonconvergence="ignore")
    assert stats.stop_reason == "timeout"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"z0": [0.0, 1.0]}, TypeError, "z0 must be a torch.Tensor"),
        ({"z0": torch.zeros(2, 2, dtype=torch.long)}, TypeError, "z0 must have a floating"),
        ({"z0": torch.tensor(1.0)}, ValueError, "batch dimension"),
        ({"z0": torch.zeros(0, 3)}, ValueError, "must not be empty"),
        ({"z0": torch.tensor([[math.nan]])}, ValueError, "z0 contains NaN"),
        ({"atol": -1.0}, ValueError, "atol must be finite and >= 0"),
        ({"rtol": math.inf}, ValueError, "rtol must be finite"),
        ({"atol": 0.0, "rtol": 0.0}, ValueError, "must not both be zero"),
        ({"max_steps": 0}, ValueError, "max_steps must be >= 1"),
        ({"max_steps": 2.5}, TypeError, "max_steps must be an int"),
        ({"method": "rk45"}, ValueError, "method must be one of"),
        ({"on_nonconvergence": "maybe"}, ValueError, "on_nonconvergence must be one of"),
        ({"timeout": -1.0}, ValueError, "timeout must be"),
    ],
)
@pytest.mark.parametrize("solver", ["steady_state", "fixed_point"])
def test_bad_arguments_name_the_argument(kwargs: dict, error: type, match: str,
                                         solver: str) -> None:
    kwargs = {"z0": torch.zeros(2, 3), **kwargs}
    if solver == "steady_state":
        call = lambda: steady_state(lambda t, z: -z, **kwargs)  # noqa: E731
    else:
        call = lambda: fixed_point(lambda z: 0.5 * z, **kwargs)  # noqa: E731
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    ("output", "error", "match"),
    [
        (lambda z: z[:, :2], ValueError, r"a tensor shaped like the state \(2, 3\), got \(2, 2\)"),
        (lambda z: z.double(), TypeError, "dtype torch.float32 like the state"),
        (lambda z: z.tolist(), TypeError, "a torch.Tensor"),
    ],
)
def test_bad_function_output(output, error: type, match: str) -> None:
    with pytest.raises(error, match="func must return " + match):
        steady_state(lambda t, z: output(z), torch.zeros(2, 3))
    with pytest.raises(error, match="g must return " + match):
        fixed_point(output, torch.zeros(2, 3))


def test_integrator_tolerances_looser_than_steady_state_are_rejected() -> None:
    with pytest.raises(ValueError, match="ode_atol"):
        steady_state(lambda t, z: -z, torch.ones(1, 2), atol=1e-4, ode_atol=1e-3)


def test_integrator_tolerances_barely_tighter_warn() -> None:
    with pytest.warns(RuntimeWarning, match="less than 10x tighter"):
        steady_state(lambda t, z: -z, torch.ones(1, 2), atol=1e-4, rtol=1e-4, ode_atol=5e-5,
                     ode_rtol=5e-5)


@pytest.mark.parametrize(("backend", "method"), [("torchdiffeq", "tsit5"), ("event", "ptc")])
def test_backend_method_combinations_are_checked(backend: str, method: str) -> None:
    with pytest.raises(ValueError, match="backend"):
        steady_state(lambda t, z: -z, torch.ones(1, 2), method=method, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_all_finite_fast_path_agrees_with_the_exact_test(dtype: torch.dtype) -> None:
    from contdeq.solvers.validation import all_finite

    big = torch.finfo(dtype).max
    cases = [
        torch.ones(5, dtype=dtype),
        torch.full((5,), big, dtype=dtype),  # finite entries whose sum overflows
        torch.tensor([big, -big, 1.0], dtype=dtype),
        torch.tensor([1.0, math.nan], dtype=dtype),
        torch.tensor([math.inf, -math.inf], dtype=dtype),  # the sum is NaN
        torch.tensor([1.0, math.inf], dtype=dtype),
    ]
    for x in cases:
        assert all_finite(x) == bool(torch.isfinite(x).all()), x


def test_finite_where_ignores_masked_out_entries() -> None:
    from contdeq.solvers.validation import finite_where

    x = torch.tensor([1.0, math.nan, math.inf])
    assert finite_where(x, torch.tensor([True, False, False]))
    assert not finite_where(x, torch.tensor([False, True, False]))
    assert not finite_where(x, torch.tensor([False, False, True]))
    assert finite_where(torch.ones(3), torch.ones(3, dtype=torch.bool))
