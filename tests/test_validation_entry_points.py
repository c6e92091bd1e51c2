"""Bad input at every public entry point fails at once, naming the argument, what was expected
and what was received (shape, dtype or device)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import contdeq
from contdeq.solvers import fixed_point, steady_state

from .layer_models import TanhCell

F64 = torch.float64


def cell() -> TanhCell:
    return TanhCell(3, 2)


def x64(batch: int = 4, features: int = 2) -> torch.Tensor:
    return torch.randn(batch, features, dtype=F64)


def solve(**kwargs: object) -> Callable[[], object]:
    return lambda: steady_state(lambda t, z: -z, torch.ones(2, 3), **kwargs)


CASES: dict[str, tuple[Callable[[], object], type[Exception], str]] = {
    # steady_state / fixed_point
    "func not callable": (lambda: steady_state(3, torch.zeros(2, 3)), TypeError,
                          r"func must be callable as func\(t, z\).*got int"),
    "g not callable": (lambda: fixed_point(None, torch.zeros(2, 3)), TypeError,
                       r"g must be callable as g\(z\).*got NoneType"),
    "z0 not a tensor": (lambda: steady_state(lambda t, z: -z, [1.0]), TypeError,
                        "z0 must be a torch.Tensor, got list"),
    "z0 integer dtype": (lambda: fixed_point(lambda z: z, torch.zeros(2, 3, dtype=torch.int64)),
                         TypeError, "z0 must have a floating-point dtype, got torch.int64"),
    "z0 without batch": (lambda: steady_state(lambda t, z: -z, torch.tensor(1.0)), ValueError,
                         r"z0 must have a batch dimension first, shape \(B, \.\.\.\)"),
    "z0 with NaN": (lambda: steady_state(lambda t, z: -z, torch.full((2, 2), float("nan"))),
                    ValueError, "z0 contains NaN or Inf"),
    "output shape": (lambda: steady_state(lambda t, z: -z[:, :2], torch.zeros(2, 3)),
                     ValueError, r"shaped like the state \(2, 3\), got \(2, 2\)"),
    "output dtype": (lambda: fixed_point(lambda z: z.double(), torch.zeros(2, 3)), TypeError,
                     "g must return dtype torch.float32 like the state, got torch.float64"),
    "output device": (lambda: steady_state(lambda t, z: torch.empty_like(z, device="meta"),
                                           torch.zeros(2, 3)),
                      ValueError, "on the state's device cpu, got meta"),
    "max_steps": (solve(max_steps=0), ValueError, "max_steps must be >= 1, got 0"),
    "timeout": (solve(timeout=-1.0), ValueError, "timeout must be finite and > 0, got -1.0"),
    "method": (solve(method="euler"), ValueError, "method must be one of .* got 'euler'"),
    "tolerances": (solve(atol=float("nan")), ValueError, "atol must be finite and >= 0"),
    "policy": (solve(on_nonconvergence="log"), ValueError,
               "on_nonconvergence must be one of .* got 'log'"),
    # layers: construction
    "DEQ f": (lambda: contdeq.DEQ(lambda z, x: z), TypeError,
              r"f must be an nn.Module called as f\(z, x\), got function"),
    "DEQ f arity": (lambda: contdeq.DEQ(nn.Linear(3, 3)), TypeError,
                    r"f must be callable as f\(z, x\) \(2 positional arguments: z, x\), but "
                    r"forward\(input: torch.Tensor\) -> torch.Tensor cannot take them"),
    "MultiScaleDEQ f arity": (lambda: contdeq.MultiScaleDEQ(nn.Linear(3, 3), state_shapes=[3]),
                              TypeError, r"f must be callable as f\(zs, x\) with zs a tuple"),
    "NeuralODE f arity": (lambda: contdeq.NeuralODE(nn.Linear(3, 3)), TypeError,
                          r"f must be callable as f\(z, x\)"),
    "WeightTied f arity": (lambda: contdeq.WeightTied(nn.Linear(3, 3), 2), TypeError,
                           r"f must be callable as f\(z, x\)"),
    "NeuralSDE g arity": (lambda: contdeq.NeuralSDE(cell(), nn.Linear(3, 3)), TypeError,
                          r"g must be callable as g\(z, x\)"),
    "SkipDEQ predictor arity": (lambda: contdeq.SkipDEQ(cell(), cell()), TypeError,
                                r"predictor must be callable as predictor\(x\) \(1 positional "
                                r"argument: x\)"),
    "DEQ solver": (lambda: contdeq.DEQ(cell(), solver="secant"), ValueError,
                   "solver must be one of .* got 'secant'"),
    "DEQ option": (lambda: contdeq.DEQ(cell(), tol=1e-3), TypeError,
                   r"unknown option\(s\) \['tol'\] for solver='ode'"),
    "DEQ state_shape": (lambda: contdeq.DEQ(cell(), state_shape=(3, 0)), ValueError,
                        "state_shape must be a positive int or a tuple of them"),
    "SkipDEQ predictor": (lambda: contdeq.SkipDEQ(cell(), "linear"), TypeError,
                          "predictor must be an nn.Module .* got str"),
    "NeuralODE t_end": (lambda: contdeq.NeuralODE(cell(), t_end=0.0), ValueError,
                        "t_end must be a finite float > 0, got 0.0"),
    # layers: forward
    "x not a tensor": (lambda: contdeq.DEQ(cell(), state_shape=3)([1.0]), TypeError,
                       "x must be a torch.Tensor, got list"),
    "x integer": (lambda: contdeq.DEQ(cell(), state_shape=3)(torch.ones(4, 2, dtype=torch.long)),
                  TypeError, "x must have a floating-point dtype, got torch.int64"),
    "x dtype vs f": (lambda: contdeq.DEQ(cell(), state_shape=3)(torch.randn(4, 2)),
                     RuntimeError, "x torch.float32 on cpu, f's parameters torch.float64"),
    "x features vs f": (lambda: contdeq.DEQ(cell(), state_shape=3)(x64(4, 5)), RuntimeError,
                        r"state z of shape \(4, 3\) and x of shape \(4, 5\)"),
    "state_shape left out": (lambda: contdeq.DEQ(cell())(x64()), RuntimeError,
                             r"set state_shape=\.\.\. on the layer"),
    "z0 shape": (lambda: contdeq.DEQ(cell(), state_shape=3)(x64(), torch.zeros(4, 4, dtype=F64)),
                 ValueError, r"z0 must have shape \(B, \*state_shape\) = \(4, 3\), got \(4, 4\)"),
    "z0 batch": (lambda: contdeq.DEQ(cell(), state_shape=3)(x64(), torch.zeros(2, 3, dtype=F64)),
                 ValueError, r"z0 must have x's batch size 4 first, got shape \(2, 3\)"),
    "z0 dtype": (lambda: contdeq.DEQ(cell(), state_shape=3)(x64(), torch.zeros(4, 3)),
                 TypeError, "z0 must have x's dtype torch.float64, got torch.float32"),
    "predictor output": (lambda: contdeq.SkipDEQ(cell(), nn.Linear(2, 5, dtype=F64),
                                                 state_shape=3)(x64()),
                         ValueError, r"predictor\(x\) must return the state's shape \(4, 3\), "
                                     r"got \(4, 5\)"),
    # functional equilibrium
    "equilibrium f": (lambda: contdeq.equilibrium(lambda z, x: z, x64(), x64(),
                                                  solver=contdeq.ForwardSolver()),
                      TypeError, "f must be an nn.Module"),
    "equilibrium x": (lambda: contdeq.equilibrium(cell(), [1.0], x64(),
                                                  solver=contdeq.ForwardSolver()),
                      TypeError, "x must be a torch.Tensor, got list"),
    "equilibrium solver": (lambda: contdeq.equilibrium(cell(), x64(), x64(4, 3), solver="ode"),
                           TypeError, "solver must be a contdeq.ForwardSolver, got str"),
    "equilibrium z0 batch": (lambda: contdeq.equilibrium(cell(), x64(), x64(3, 3),
                                                         solver=contdeq.ForwardSolver()),
                             ValueError, r"x has shape \(4, 2\), z0 has shape \(3, 3\)"),
    "equilibrium z0 dtype": (lambda: contdeq.equilibrium(cell(), x64(), torch.zeros(4, 3),
                                                         solver=contdeq.ForwardSolver()),
                             TypeError, r"x's dtype and device \(torch.float64, cpu\), got "
                                        r"\(torch.float32, cpu\)"),
    "backward_mode": (lambda: contdeq.backward_mode(rtol=0.0), ValueError,
                      "backward_rtol must be finite and > 0, got 0.0"),
    "Implicit": (lambda: contdeq.Implicit(max_steps=0), ValueError,
                 "max_steps must be >= 1, got 0"),
    "Implicit method": (lambda: contdeq.Implicit("lbfgs"), ValueError,
                        r"method must be one of \(.*'ode'.*\), got 'lbfgs'"),
    "equilibrium backward": (lambda: contdeq.equilibrium(cell(), x64(), x64(4, 3),
                                                         solver=contdeq.ForwardSolver(),
                                                         backward=3),
                             TypeError, "backward must be a backward mode name"),
    # helpers
    "aux_loss": (lambda: contdeq.aux_loss(3), TypeError, "model must be an nn.Module, got int"),
    "spectral_norm_cap": (lambda: contdeq.spectral_norm_cap(nn.Linear(2, 2), cap=-1), ValueError,
                          "cap must be a float > 0, got -1"),
    "spectral_norm_cap name": (lambda: contdeq.spectral_norm_cap(nn.Linear(2, 2), "w"),
                               ValueError, "has no tensor attribute 'w'"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_named(case: str) -> None:
    call, error, message = CASES[case]
    with pytest.raises(error, match=message):
        call()


def test_signature_check_is_kept_per_code_not_per_name() -> None:
    """Catches a kept signature verdict that lets a function of the wrong arity through because
    a function of the same name (or a method of the same class) passed before: each lambda made
    by the same line shares the verdict, a different one is checked again."""
    import torch

    from contdeq.solvers import steady_state

    z0 = torch.zeros(2, 3)
    for _ in range(2):  # the second call uses the kept verdict for this code
        steady_state(lambda t, z: -z, z0, max_steps=5, on_nonconvergence="ignore")
    with pytest.raises(TypeError, match="cannot take them"):
        steady_state(lambda z: -z, z0)
    with pytest.raises(TypeError, match="cannot take them"):
        steady_state(lambda t, z, w: -z, z0)


def test_signature_check_follows_decorated_functions() -> None:
    """Catches a kept verdict for a decorator's wrapper (one code object for every function
    the decorator wraps) letting a wrapped function of the wrong arity through after another
    passed: it then failed inside the solve with Python's bare arity error, naming neither the
    argument nor the fix."""
    import functools

    import torch

    from contdeq.solvers import steady_state

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    @decorate
    def flow(t, z):
        return -z

    @decorate
    def map_of_the_state(z):
        return -z

    z0 = torch.ones(2, 3)
    for _ in range(2):
        steady_state(flow, z0, max_steps=5, on_nonconvergence="ignore")
    with pytest.raises(TypeError, match=r"func must be callable as func\(t, z\).*cannot take them"):
        steady_state(map_of_the_state, z0)
