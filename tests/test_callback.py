"""The per-step solver callback (contdeq.solvers.callback) in every solver loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import contdeq
from contdeq.solvers import (
    FIXED_POINT_METHODS,
    STEADY_STATE_METHODS,
    ConvergenceError,
    fixed_point,
    steady_state,
)
from contdeq.solvers.callback import Restart, StepInfo, Stop
from contdeq.solvers.torchdiffeq_backend import TORCHDIFFEQ_FSAL_METHODS
from tests.layer_models import TanhCell

B, D = 4, 6
TOL = 1e-5
#: adaptive_heun (second order) needs thousands of steps at TOL: a looser test for it.
LOOSE = {"adaptive_heun": 1e-3}

#: Every loop: (kind, method, backend).
LOOPS = (
    [("map", m, None) for m in FIXED_POINT_METHODS]
    + [("ode", m, "lean") for m in STEADY_STATE_METHODS]
    + [("ode", m, "torchdiffeq") for m in TORCHDIFFEQ_FSAL_METHODS]
)
LOOP_IDS = [m if backend in (None, "lean") else f"{m}[{backend}]" for _, m, backend in LOOPS]
MAP_METHODS = list(FIXED_POINT_METHODS)


class Problem:
    """``g(z) = tanh(W z + x)``, contractive (``||W|| = 0.5``), float64; ``x`` can be swapped."""

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(D, D, generator=gen, dtype=torch.float64)
        self.w = 0.5 * w / torch.linalg.matrix_norm(w, 2)
        self.x = torch.randn(B, D, generator=gen, dtype=torch.float64)
        self.other_x = torch.randn(B, D, generator=gen, dtype=torch.float64)

    def g(self, z: Tensor) -> Tensor:
        return torch.tanh(z @ self.w.T + self.x)

    def fixed_point_of(self, x: Tensor) -> Tensor:
        z = torch.zeros(B, D, dtype=torch.float64)
        for _ in range(200):
            z = torch.tanh(z @ self.w.T + x)
        return z


def solve(kind: str, method: str, backend: str | None, problem: Problem,
          z0: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, Any]:
    z0 = torch.zeros(B, D, dtype=torch.float64) if z0 is None else z0
    kwargs.setdefault("on_nonconvergence", "ignore")
    tol = LOOSE.get(method, TOL)
    if kind == "map":
        return fixed_point(problem.g, z0, method=method, atol=tol, rtol=tol, **kwargs)
    return steady_state(lambda t, z: problem.g(z) - z, z0, method=method, backend=backend,
                        atol=tol, rtol=tol, **kwargs)


def iterations(stats: Any, kind: str, method: str) -> int:
    """Iterations after which the callback runs: accepted Runge-Kutta steps, else all."""
    if kind == "ode" and method not in ("ptc", "implicit_ptc"):
        return stats.accepted
    return stats.steps


@pytest.mark.parametrize(("kind", "method", "backend"), LOOPS, ids=LOOP_IDS)
def test_callback_sees_every_accepted_step_and_changes_nothing(
        kind: str, method: str, backend: str | None) -> None:
    """A no-op callback runs once per accepted step with increasing step numbers, its last
    call shows the returned state and residuals, and the solve is bit-for-bit the one without
    a callback (same NFE): catches a loop that skips the hook, calls it on rejected trials or
    lets it perturb the solve."""
    problem = Problem()
    z_ref, ref = solve(kind, method, backend, problem)
    seen: list[StepInfo] = []
    z, stats = solve(kind, method, backend, problem, callback=seen.append)
    assert ref.all_converged
    assert stats.nfe == ref.nfe and stats.steps == ref.steps
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
    assert len(seen) == iterations(stats, kind, method) > 1
    steps = [info.step for info in seen]
    assert steps == sorted(set(steps)) and steps[-1] == stats.steps
    last = seen[-1]
    torch.testing.assert_close(last.z, z, rtol=0, atol=0)
    torch.testing.assert_close(last.residual, stats.residual, rtol=0, atol=0)
    assert not bool(last.active.any()) and bool(seen[0].active.any())
    assert last.method == method and last.x is None
    assert (last.t is None) == (kind == "map")


@pytest.mark.parametrize(("kind", "method", "backend"), LOOPS, ids=LOOP_IDS)
def test_callback_stop_ends_the_solve_honestly(kind: str, method: str,
                                               backend: str | None) -> None:
    """``Stop()`` after the second step ends the solve there with stop reason "callback" and
    the samples reported unconverged (``on_nonconvergence="raise"`` raises): catches a stop
    that is ignored, or reported as convergence."""
    problem = Problem()

    def stop_second(info: StepInfo) -> Stop | None:
        return Stop() if info.step >= 2 else None

    _, stats = solve(kind, method, backend, problem, callback=stop_second)
    assert stats.stop_reason == contdeq.solvers.StopReason.CALLBACK == "callback"
    assert stats.steps == 2 and not stats.all_converged
    with pytest.raises(ConvergenceError, match="stop=callback"):
        solve(kind, method, backend, problem, callback=stop_second, on_nonconvergence="raise")


@pytest.mark.parametrize(("kind", "method", "backend"), LOOPS, ids=LOOP_IDS)
def test_callback_replaces_the_state(kind: str, method: str, backend: str | None) -> None:
    """``Restart(z=z*)`` after the second step (z* the fixed point) ends the solve at once,
    converged at z*, for one extra function call: catches a loop that ignores the new state
    or keeps the old residuals."""
    problem = Problem()
    z_star = problem.fixed_point_of(problem.x)
    _, stopped = solve(kind, method, backend, problem,
                       callback=lambda info: Stop() if info.step == 2 else None)

    def jump(info: StepInfo) -> Restart | None:
        return Restart(z=z_star.clone()) if info.step == 2 else None

    z, stats = solve(kind, method, backend, problem, callback=jump)
    assert stats.all_converged and stats.steps == 2
    assert stats.nfe == stopped.nfe + 1
    torch.testing.assert_close(z, z_star, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("kind", "method", "backend"), LOOPS, ids=LOOP_IDS)
def test_callback_changes_the_function(kind: str, method: str, backend: str | None) -> None:
    """Changing the function's input at step 2 and returning ``Restart()`` gives the fixed
    point of the new input (converged, tested on the new function): catches a solve that
    keeps testing stale residuals of the old function, or returns the old fixed point."""
    problem = Problem()
    target = problem.fixed_point_of(problem.other_x)

    def swap(info: StepInfo) -> Restart | None:
        if info.step == 2:
            problem.x = problem.other_x
            return Restart()
        return None

    z, stats = solve(kind, method, backend, problem, callback=swap)
    assert stats.all_converged
    torch.testing.assert_close(z, target, rtol=0, atol=30 * LOOSE.get(method, TOL))
    assert (z - Problem().fixed_point_of(Problem().x)).abs().max() > 1e-2


@pytest.mark.parametrize("method", MAP_METHODS)
def test_restart_clears_the_fixed_point_history(method: str) -> None:
    """After ``Restart(z=z_k)`` the iterates are exactly those of a fresh solve from ``z_k``:
    Anderson/Broyden memory and Newton's kept values are forgotten. Catches a ``reset()``
    that leaves history behind (the iterates then differ)."""
    problem = Problem()
    restart_at = 3
    after: list[Tensor] = []
    start: list[Tensor] = []

    def restart(info: StepInfo) -> Restart | None:
        if info.step == restart_at:
            start.append(info.z.clone())
            return Restart(z=info.z.clone())
        if info.step > restart_at:
            after.append(info.z.clone())
        return None

    solve("map", method, None, problem, callback=restart)
    fresh: list[Tensor] = []
    solve("map", method, None, problem, z0=start[0],
          callback=lambda info: fresh.append(info.z.clone()))
    n = min(len(after), len(fresh))
    assert n >= 2
    for ours, theirs in zip(after[:n], fresh[:n], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", ["anderson", "broyden"])
def test_without_reset_the_history_would_differ(method: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: with ``reset`` disabled, the iterates after a restart differ
    from a fresh solve's (the memory mixes old iterates in)."""
    monkeypatch.setattr(FIXED_POINT_METHODS[method], "reset", lambda self: None)
    problem = Problem()
    after: list[Tensor] = []
    start: list[Tensor] = []

    def restart(info: StepInfo) -> Restart | None:
        if info.step == 3:
            start.append(info.z.clone())
            return Restart(z=(info.z + 0.3).clone())
        if info.step > 3:
            after.append(info.z.clone())
        return None

    solve("map", method, None, problem, callback=restart)
    fresh: list[Tensor] = []
    solve("map", method, None, problem, z0=start[0] + 0.3,
          callback=lambda info: fresh.append(info.z.clone()))
    assert (after[0] - fresh[0]).abs().max() > 1e-6


@pytest.mark.parametrize(
    ("kwargs", "callback", "error", "message"),
    [
        ({}, "not callable", TypeError, "callback must be None or callable"),
        ({}, lambda info: "stop", TypeError, "must return None, Stop"),
        ({}, lambda info: Restart(z=torch.zeros(2, 2)), ValueError, r"Restart\(z=...\)"),
        ({}, lambda info: Restart(x=torch.zeros(B, D)), ValueError, "layer's input"),
        ({"backend": "event"}, lambda info: None, ValueError, "backend='event'"),
    ],
)
def test_callback_errors_name_the_problem(kwargs: dict, callback: Callable, error: type,
                                          message: str) -> None:
    """Bad callbacks and answers get errors naming what was expected: catches a silently
    ignored answer (a wrongly shaped state, an input change with no input)."""
    problem = Problem()
    with pytest.raises(error, match=message):
        steady_state(lambda t, z: problem.g(z) - z, torch.zeros(B, D, dtype=torch.float64),
                     callback=callback, **kwargs)


def test_restart_needs_a_solver_with_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed-point solver without ``reset()`` cannot serve a restart: a clear TypeError,
    not a solve on stale history."""
    monkeypatch.delattr(FIXED_POINT_METHODS["picard"], "reset")
    problem = Problem()
    with pytest.raises(TypeError, match="has no reset"):
        fixed_point(problem.g, torch.zeros(B, D, dtype=torch.float64), method="picard",
                    callback=lambda info: Restart())


@pytest.mark.parametrize("solver", ["ode", "anderson"])
def test_layer_callback_sees_and_changes_the_input(solver: str) -> None:
    """A layer's ``callback`` sees the layer's input and ``Restart(x=x2)`` makes the layer
    return the equilibrium for ``x2``: catches a layer that drops the callback, shows the
    wrong input or keeps solving for the old one."""
    torch.manual_seed(0)
    cell = TanhCell(D, D, lipschitz=0.5, dtype=torch.float64)
    x = torch.randn(B, D, dtype=torch.float64)
    x2 = torch.randn(B, D, dtype=torch.float64)
    plain = contdeq.DEQ(cell, solver=solver, atol=TOL, rtol=TOL).eval()
    with torch.no_grad():
        expected = plain(x2)
    seen: list[Tensor] = []

    def swap(info: StepInfo) -> Restart | None:
        assert info.x is not None
        seen.append(info.x.clone())
        return Restart(x=x2) if info.step == 1 else None

    layer = contdeq.DEQ(cell, solver=solver, atol=TOL, rtol=TOL, callback=swap).eval()
    with torch.no_grad():
        z = layer(x)
    torch.testing.assert_close(seen[0], x, rtol=0, atol=0)
    torch.testing.assert_close(seen[-1], x2, rtol=0, atol=0)
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-4)
    assert layer.stats.forward.all_converged
    with pytest.raises(ValueError, match=r"Restart\(x=...\)"):
        contdeq.DEQ(cell, solver=solver, callback=lambda info: Restart(x=x[:1])).eval()(x)
