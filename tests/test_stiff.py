"""``steady_state(method="implicit_ptc")`` on stiff problems, with default tolerances, against
dense solves and scipy; exact counts of evaluations, Jacobian products and GMRES iterations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contdeq.solvers import NonFiniteError, steady_state

from . import stiff_problems
from .problems import CallCounter


def _solve(problem: stiff_problems.StiffProblem):
    return steady_state(lambda t, z: problem.rhs(z), problem.z0, method="implicit_ptc",
                        on_nonconvergence="raise")


def _relative_error(z: torch.Tensor, reference: torch.Tensor) -> float:
    return float((z - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("make", [stiff_problems.heat, stiff_problems.bratu,
                                  stiff_problems.spd_linear], ids=["heat", "bratu", "spd_1e4"])
def test_converges_with_default_tolerances(make) -> None:
    """Heat equation (50 points, eigenvalues to -1e4), Bratu lambda=1, SPD with condition 1e4:
    explicit steps are stability-limited here (tens of thousands of steps); catches a wrong sign
    in the backward-Euler system, a broken step growth (stalls at max_steps) or a wrong answer."""
    problem = make(n=50)
    z, stats = _solve(problem)
    assert stats.all_converged and stats.steps <= 20
    # The residual test (1e-4) bounds the error by the conditioning: 1e-4 * 1e4 at worst.
    assert _relative_error(z, problem.reference) < 1e-3
    assert stats.jvps is not None and stats.linear_iterations is not None


def test_scipy_tutorial_pde_small() -> None:
    """scipy's newton_krylov tutorial PDE on a 24x24 grid (nonlinear, with a dense rank-one
    Jacobian term): agrees with scipy's own solution."""
    problem = stiff_problems.scipy_tutorial_pde(24)
    z, stats = _solve(problem)
    assert stats.all_converged
    assert _relative_error(z, problem.reference) < 1e-4


def test_counts_by_hand() -> None:
    """``dz/dt = b - 2 z``: each backward-Euler system ``(1/h + 2) delta = F`` is a multiple of
    the identity, so GMRES takes exactly one product per step. Catches JVPs counted as
    evaluations, GMRES iterations miscounted, or evaluations missed by ``nfe``: nfe is the
    initial derivative, one per step, and one call that records the graph at ``z0``."""
    b = torch.randn(3, 7, dtype=torch.float64)
    func = CallCounter(lambda t, z: b - 2 * z)
    z, stats = steady_state(func, torch.zeros_like(b), method="implicit_ptc")
    assert stats.all_converged
    torch.testing.assert_close(z, b / 2, atol=1e-4, rtol=1e-4)
    assert stats.nfe == func.calls == stats.steps + 2
    assert stats.jvps == stats.linear_iterations == stats.steps


def test_nan_region_stalls_at_the_best_iterate() -> None:
    """A function that returns NaN beyond ``|z| > 0.5`` while its root is at 1: NaN trials are
    rejected and shrunk, finite ones accepted, and the solve stops as stalled (a non-convergence,
    raised here as asked) at a finite best iterate inside the region. Catches an endless loop
    of rejected steps, a silent NaN result, or non-convergence disguised as another error."""
    from contdeq.solvers import ConvergenceError

    def func(t, z):
        return torch.where(z.abs() > 0.5, torch.nan, 1.0 - z)

    with pytest.raises(ConvergenceError) as caught:
        steady_state(func, torch.zeros(2, 3, dtype=torch.float64), method="implicit_ptc",
                     max_steps=500, on_nonconvergence="raise")
    stats = caught.value.stats
    assert stats.stop_reason == "stalled" and stats.steps < 500
    assert bool(torch.isfinite(stats.residual).all())
    assert float(stats.residual.max()) <= 0.5 + 1e-12


def test_nonfinite_function_raises() -> None:
    """A function that is NaN at every state but ``z0``: every trial is rejected, and since the
    function itself returned NaN at finite states the solve raises NonFiniteError (never a
    silent NaN, never an endless loop of shrinking steps)."""
    z0 = torch.zeros(2, 3, dtype=torch.float64)

    def func(t, z):
        return torch.where(z == 0, 1.0 - z, torch.nan)

    with pytest.raises(NonFiniteError):
        steady_state(func, z0, method="implicit_ptc", max_steps=200, on_nonconvergence="ignore")


@pytest.mark.slow
def test_benchmark_quick(tmp_path: Path) -> None:
    """``benchmarks/steady_states.py --quick`` runs end to end, records failures of the explicit
    methods as outcomes, and implicit_ptc converges on every stiff problem."""
    from benchmarks import steady_states

    rows = steady_states.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "steady_states_quick.md").exists()
    ptc_rows = [r for r in rows if r["method"] == "implicit_ptc"]
    assert len(ptc_rows) == 4 and all(r["outcome"] == "converged" for r in ptc_rows)
    assert all(r["error"] < 1e-3 for r in ptc_rows)


def test_reaction_diffusion_with_rising_residual() -> None:
    """A stable stiff two-species reaction-diffusion steady state (Brusselator with a feed,
    below its Hopf point: every Jacobian eigenvalue has real part <= -20; non-normal reaction
    terms): scipy's BDF integrates the flow to the reference, and implicit_ptc at its defaults
    converges to it although its residual rises on the way (the case where a rule accepting
    only decreasing steps stalled and raised NonFiniteError at step 519)."""
    import numpy as np
    from scipy.integrate import solve_ivp

    problem = stiff_problems.reaction_diffusion()
    shape = problem.z0.shape[1:]

    def flat(v: torch.Tensor) -> torch.Tensor:
        return problem.rhs(v.reshape(1, *shape)).reshape(-1)

    reference = problem.reference
    jac = torch.autograd.functional.jacobian(flat, reference[0].reshape(-1))
    assert float(torch.linalg.eigvals(jac).real.max()) < -1.0
    for b in range(problem.z0.shape[0]):
        sol = solve_ivp(lambda t, y: flat(torch.from_numpy(y)).numpy(), (0.0, 50.0),
                        problem.z0[b].reshape(-1).numpy(), method="BDF", rtol=1e-8, atol=1e-10,
                        jac=lambda t, y: torch.autograd.functional.jacobian(
                            flat, torch.from_numpy(y)).numpy())
        assert sol.status == 0
        assert float(np.abs(sol.y[:, -1] - reference[b].reshape(-1).numpy()).max()) < 1e-6
    z, stats = steady_state(lambda t, z: problem.rhs(z), problem.z0, method="implicit_ptc",
                            on_nonconvergence="raise", record_trajectory=True)
    history = stats.residual_history
    assert bool((history[1:, 0] > history[:-1, 0]).any())  # the residual rose on the way
    assert _relative_error(z, reference) < 1e-3
