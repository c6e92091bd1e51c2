"""Issue #19 part 1: the compiled ptc loop (``steady_state(..., compile=True)``), the layers'
``compile`` switch and whole-model ``torch.compile``.

The default tests run the compiled loop's logic with the step function uncompiled (Inductor
takes seconds to a minute per graph on this CPU): the masked, branch-free step and the loop
around it must reproduce the eager ptc loop exactly. The ``slow`` tests compile for real.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.utils import counters

import contdeq
from contdeq.solvers import PTC, NonFiniteError, steady_state
from contdeq.solvers import compiled as compiled_module

from .fuzz_cases import FAMILIES, Case, Poisoned, build_map
from .problems import linear_ode, spd_batch, tanh_layer

#: One step per compiled call.
ONE_STEP = PTC(steps_per_call=1)


@pytest.fixture
def uncompiled_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the compiled loop with its step function as plain Python (no Dynamo/Inductor)."""
    monkeypatch.setattr(compiled_module, "_compiled_ptc_steps", compiled_module._ptc_steps)


def _same_solve(func, z0: Tensor, **kw) -> tuple[Tensor, Tensor]:
    """Solve eagerly and with ``compile=True``; assert identical counts and convergence, and
    residuals equal to rounding (a fused float32 kernel rounds differently); return both
    states."""
    # float32: a residual of 1e-5 at |z| ~ 1 carries a relative rounding error of ~1e-2.
    rtol = 1e-9 if z0.dtype == torch.float64 else 1e-2
    z_e, s_e = steady_state(func, z0, method="ptc", **kw)
    z_c, s_c = steady_state(func, z0, method="ptc", compile=True, **kw)
    assert (s_c.nfe, s_c.steps, s_c.accepted, s_c.rejected, s_c.stop_reason) == (
        s_e.nfe, s_e.steps, s_e.accepted, s_e.rejected, s_e.stop_reason)
    assert torch.equal(s_c.converged, s_e.converged)
    torch.testing.assert_close(s_c.residual, s_e.residual, rtol=rtol, atol=0)
    torch.testing.assert_close(s_c.t_final, s_e.t_final, rtol=rtol, atol=0)
    return z_e, z_c


@pytest.mark.usefixtures("uncompiled_step")
def test_masked_step_matches_the_eager_loop_with_freezing() -> None:
    """Catches a masked step that moves frozen samples, miscounts steps or evaluations, or
    grows/shrinks step sizes differently from the eager ptc loop (samples of different
    stiffness converge at different steps, so freezing is exercised)."""
    a = spd_batch(6, 5, torch.float64, lo=0.3, hi=3.0)
    b = torch.randn(6, 5, dtype=torch.float64)
    func, exact = linear_ode(a, b)
    z_e, z_c = _same_solve(func, torch.zeros(6, 5, dtype=torch.float64), atol=1e-8, rtol=1e-8,
                           max_steps=5000)
    torch.testing.assert_close(z_c, z_e, rtol=0, atol=1e-12)
    torch.testing.assert_close(z_c, exact, rtol=0, atol=1e-6)


@pytest.mark.usefixtures("uncompiled_step")
def test_masked_step_accepts_rising_residuals_like_the_eager_loop() -> None:
    """Catches the fused slow path (steps that raise the residual of a non-normal flow) taking
    different decisions from the eager loop's, or a stall (1,000 steps at pseudo-time 0)."""
    a = torch.tensor([[-1.0, 10.0], [0.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    z_e, z_c = _same_solve(lambda t, z: z @ a.T + b, torch.zeros(1, 2, dtype=torch.float64),
                           on_nonconvergence="raise")
    torch.testing.assert_close(z_c, z_e, rtol=0, atol=1e-12)


@pytest.mark.usefixtures("uncompiled_step")
def test_max_steps_returns_the_best_iterate_and_records_the_trajectory() -> None:
    """Catches a compiled loop that returns its last state instead of each sample's best when
    it stops at max_steps, or drops the recorded residual history."""
    theta = 1.3
    r = 0.95 * torch.tensor([[math.cos(theta), -math.sin(theta)],
                             [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    func = lambda t, z: z @ r.T + b - z  # noqa: E731
    z0 = torch.zeros(2, 2, dtype=torch.float64)
    kw = {"max_steps": 25, "on_nonconvergence": "ignore", "record_trajectory": True}
    z_e, s_e = steady_state(func, z0, method="ptc", **kw)
    z_c, s_c = steady_state(func, z0, method="ptc", compile=True, **kw)
    assert s_c.stop_reason == s_e.stop_reason == "max_steps"
    torch.testing.assert_close(z_c, z_e, rtol=0, atol=1e-12)
    torch.testing.assert_close(s_c.residual, s_e.residual, rtol=1e-9, atol=0)
    torch.testing.assert_close(s_c.residual_history, s_e.residual_history, rtol=1e-9, atol=0)
    final_res = contdeq.solvers.sample_rms(func(None, z_c))
    torch.testing.assert_close(final_res, s_c.residual, rtol=1e-9, atol=0)


@pytest.mark.usefixtures("uncompiled_step")
def test_nonfinite_trials_are_rejected_then_raise() -> None:
    """Catches a compiled loop that treats an overflowing trial step as fatal (it must shrink
    and go on), or that loops silently when f is NaN everywhere but at z0."""
    z, stats = steady_state(lambda t, z: -5.0 * torch.sinh(z - 1.0),
                            torch.full((2, 3), -8.0, dtype=torch.float64), method="ptc",
                            compile=True, first_step=1.0, max_steps=3000,
                            on_nonconvergence="raise")
    assert stats.rejected >= 1
    torch.testing.assert_close(z, torch.ones_like(z), rtol=0, atol=1e-3)
    with pytest.raises(NonFiniteError, match="trial step"):
        steady_state(lambda t, z: torch.where(z == 0, 1.0, math.nan).to(z.dtype),
                     torch.zeros(2, 3), method="ptc", compile=True, max_steps=500)


def _fuzz_solve(case: Case, compile: bool, method: str | PTC = "ptc"
                ) -> tuple[Tensor, object] | str:
    """The case's ptc solve (eager or compiled loop), or ``"nonfinite"`` when it raised."""
    problem = build_map(case)
    g = problem.g
    if case.family in ("nan_midway", "inf_midway"):
        g = Poisoned(g, 2 + case.seed % 12, math.nan if case.family == "nan_midway" else math.inf)
    try:
        return steady_state(lambda t, z: g(z) - z, problem.z0, method=method, atol=case.atol,
                            rtol=case.tolerance, max_steps=case.max_steps,
                            on_nonconvergence="ignore", t_max=3.0 + 7.0 * case.strength
                            if case.finite_t_max else math.inf,
                            per_sample=case.layout_used != "batch_wide", compile=compile)
    except NonFiniteError:
        return "nonfinite"


@pytest.mark.usefixtures("uncompiled_step")
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_step_matches_the_eager_loop_on_every_fuzz_family(family: str) -> None:
    """Catches any divergence of the compiled loop from the eager ptc loop (state, NFE, steps,
    accepted/rejected, stop reason, per-sample convergence, or a NonFiniteError one raises and
    the other does not) on the fuzz suite's problem families: expansive, oscillating, stiff,
    non-normal, overflowing, coupled, tiny/huge scales, NaN/Inf injected mid-solve; finite and
    infinite t_max."""
    for seed in range(4):
        case = Case(seed=seed, family=family, solver="ptc", shape=(3, 4),
                    dtype=("float64", "float32")[seed % 2], max_steps=60, policy="ignore",
                    strength=(0.2, 0.9, 0.5, 0.7)[seed], finite_t_max=seed % 3 == 1)
        eager, compiled = _fuzz_solve(case, False), _fuzz_solve(case, True)
        if eager == "nonfinite" or compiled == "nonfinite":
            assert eager == compiled, case
            continue
        (z_e, s_e), (z_c, s_c) = eager, compiled
        assert (s_c.nfe, s_c.steps, s_c.accepted, s_c.rejected, s_c.stop_reason) == (
            s_e.nfe, s_e.steps, s_e.accepted, s_e.rejected, s_e.stop_reason), case
        assert torch.equal(s_c.converged, s_e.converged), case
        torch.testing.assert_close(z_c, z_e, rtol=1e-5, atol=1e-6 * case.scale, msg=str(case))


@pytest.mark.usefixtures("uncompiled_step")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("steps_per_call", [2, 5])
def test_several_steps_per_call_return_the_same_states(family: str, steps_per_call: int
                                                       ) -> None:
    """Catches ``PTC(steps_per_call=k)`` moving a sample another way than one step per call
    (frozen samples moving in the steps after convergence, a call overrunning ``max_steps`` or
    ``t_max``), or miscounting its evaluations: the same states and convergence, up to
    ``k - 1`` more evaluations (one per step, counted), on every fuzz family. NaN/Inf
    families are compared where neither raised (the bound on NaN/Inf trials is checked between
    calls)."""
    for seed in range(4):
        case = Case(seed=seed, family=family, solver="ptc", shape=(3, 4),
                    dtype=("float64", "float32")[seed % 2], max_steps=61, policy="ignore",
                    strength=(0.2, 0.9, 0.5, 0.7)[seed], finite_t_max=seed % 3 == 1)
        one = _fuzz_solve(case, True)
        several = _fuzz_solve(case, True, PTC(steps_per_call=steps_per_call))
        if "nonfinite" in (one, several):
            continue
        (z_1, s_1), (z_k, s_k) = one, several
        assert torch.equal(z_k, z_1), case
        assert torch.equal(s_k.converged, s_1.converged), case
        assert 0 <= s_k.nfe - s_1.nfe < steps_per_call, case
        assert s_k.nfe - s_k.steps == s_1.nfe - s_1.steps, case  # one evaluation per step
        assert s_k.steps <= case.max_steps


@pytest.mark.usefixtures("uncompiled_step")
def test_a_call_of_fewer_steps_is_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the last call of a solve cut by max_steps (fewer steps than steps_per_call)
    running with Dynamo's guards skipped: with only the graph of ``k`` steps cached, the
    unguarded call ran it, took ``k`` steps and counted fewer (compiled, the slow test below
    shows the overrun)."""
    seen: list[tuple[bool, int]] = []
    run = compiled_module._run_step

    def spy(guarded: bool, *args: object) -> object:
        seen.append((guarded, args[-1]))
        return run(guarded, *args)

    monkeypatch.setattr(compiled_module, "_run_step", spy)
    g, _ = tanh_layer(6, 5, torch.float64)
    _, stats = steady_state(_residual(g), torch.zeros(5, 6, dtype=torch.float64),
                            method=PTC(steps_per_call=4), compile=True, atol=1e-14, rtol=0.0,
                            max_steps=10, on_nonconvergence="ignore")
    assert [n for _, n in seen] == [4, 4, 2] and stats.steps == 10
    assert [guarded for guarded, _ in seen] == [True, False, True]


@pytest.mark.slow
def test_compiled_calls_cut_by_max_steps_take_the_steps_they_count() -> None:
    """Catches a compiled solve overrunning max_steps with steps_per_call > 1 (its last,
    shorter call ran the cached graph of k steps unguarded: 12 steps taken, 10 counted)."""
    g, _ = tanh_layer(16, 8, torch.float32, seed=3)
    z0 = torch.zeros(8, 16)
    kw = {"atol": 1e-12, "rtol": 0.0, "max_steps": 10, "on_nonconvergence": "ignore"}
    torch._dynamo.reset()  # the graph of 4 steps is the only one cached when the last call runs
    z_4, s_4 = steady_state(_residual(g), z0, method=PTC(steps_per_call=4), compile=True, **kw)
    z_1, s_1 = steady_state(_residual(g), z0, method=ONE_STEP, compile=True, **kw)
    assert s_4.steps == s_1.steps == 10 and s_4.nfe == s_1.nfe
    torch.testing.assert_close(z_4, z_1, rtol=0, atol=1e-6)


def test_compile_switch_is_validated() -> None:
    """Catches a compile switch that is silently ignored for a method without a compiled loop,
    accepts a non-bool, or silently drops a step callback."""
    func, _ = linear_ode(spd_batch(2, 3, torch.float64), torch.ones(2, 3, dtype=torch.float64))
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="compile=True supports method"):
        steady_state(func, z0, method="dopri5", compile=True)
    with pytest.raises(TypeError, match="compile must be a bool"):
        steady_state(func, z0, method="ptc", compile=1)
    with pytest.raises(ValueError, match="compile=True supports method"):
        contdeq.DEQ(_Cell(3), method="dopri5", compile=True)(torch.randn(2, 3))
    with pytest.raises(TypeError, match="compile must be a bool"):
        contdeq.NeuralODE(_Cell(3), compile="yes")
    with pytest.raises(ValueError, match="does not take a callback"):
        steady_state(func, z0, method="ptc", compile=True, callback=lambda info: None)


class _Cell(nn.Module):
    """``f(z, x) = tanh(W z + x)`` with ``||W||_2 <= 0.9``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = contdeq.spectral_norm_cap(nn.Linear(width, width), cap=0.9)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(z) + x)


def _residual(g: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """``dz/dt = g(z) - z``: one code object for every ``g`` (as the layers' closures)."""
    return lambda t, z: g(z) - z


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_compiled_solve_matches_eager_and_does_not_recompile() -> None:
    """Catches an Inductor-compiled step that changes the solution or the stats, and a
    recompile on a second solve with new values of the same shapes (a Python number or an
    aliasing pattern that changes between solves)."""
    g, exact = tanh_layer(16, 8, torch.float32)
    z0 = torch.zeros(8, 16)
    z_e, z_c = _same_solve(_residual(g), z0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z_c, z_e, rtol=0, atol=1e-5)
    torch.testing.assert_close(z_c, exact, rtol=0, atol=1e-4)
    before = _graphs()
    for seed in (1, 2):
        g2, exact2 = tanh_layer(16, 8, torch.float32, seed=seed)
        z, stats = steady_state(_residual(g2), z0, method="ptc", atol=1e-5, rtol=1e-5,
                                compile=True)
        assert stats.all_converged
        torch.testing.assert_close(z, exact2, rtol=0, atol=1e-4)
    assert _graphs() == before


@pytest.mark.slow
def test_whole_model_compile_trains_like_eager_without_recompiles() -> None:
    """Catches whole-model torch.compile failing, recompiling after warm-up (the issue saw the
    recompile limit hit in the solver's step), or giving different outputs and gradients than
    the eager model, for a DEQ with the compiled solver and a NeuralODE with compiled f."""
    for make in (lambda: contdeq.DEQ(_Cell(8), method="ptc", compile=True, atol=1e-4,
                                     rtol=1e-4),
                 lambda: contdeq.NeuralODE(_Cell(8), compile=True)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), make(), nn.Linear(8, 3))
        eager = nn.Sequential(*[m for m in model])  # the same modules, run eagerly
        whole = torch.compile(model)
        x = torch.randn(16, 4)
        out = whole(x)
        out.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ref = eager(x)
        ref.square().sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        for g, p in zip(grads, model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-5)
        before = _graphs()
        for _ in range(2):
            whole(torch.randn(16, 4)).sum().backward()
        assert _graphs() == before
