"""``contdeq.solvers.root`` on the 23 problems of NonlinearProblemLibrary.jl and on batches:
success judged independently (``||F(x)||_inf <= 1e-6``), honest non-convergence (stalls
reported with the best iterate), the ΨTC sign convention and options, argument errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from contdeq.solvers import ConvergenceError, ConvergenceWarning, root, sample_rms
from contdeq.solvers.implicit_ptc import PTCOptions

from .nonlinear_problems import PROBLEMS, _watson_loops, p6_watson, solved

FREUDENSTEIN_ROTH = PROBLEMS[20]


def _check_honest(problem, x: torch.Tensor, stats) -> bool:
    """The claims of ``stats`` hold for ``x``: finite, its residual the RMS of F(x), converged
    only where the independent check passes. Returns whether it solved the problem."""
    assert bool(torch.isfinite(x).all())
    torch.testing.assert_close(stats.residual, sample_rms(problem.func(x).reshape(1, -1)),
                               rtol=1e-6, atol=1e-12)
    ok = solved(problem, x)
    assert not (bool(stats.converged.all()) and not ok), "false convergence claim"
    return ok


def test_watson_vectorized_equals_the_library_loops() -> None:
    """Problem 6 is written vectorized; the library's loops give the same values."""
    x = torch.randn(7, 2, dtype=torch.float64)
    torch.testing.assert_close(p6_watson(x), _watson_loops(x), rtol=1e-12, atol=1e-12)


def test_known_solutions_are_roots() -> None:
    """Every ``sol`` the library gives is a root of the ported function (catches a porting slip
    in a coefficient); the library's Powell badly scaled solution has 7 digits."""
    for problem in PROBLEMS:
        if problem.solution is not None:
            value = problem.func(torch.tensor(problem.solution, dtype=torch.float64))
            assert float(value.abs().max()) < 1e-6, problem.number


@pytest.mark.parametrize("problem", PROBLEMS, ids=[f"p{p.number}" for p in PROBLEMS])
def test_newton_on_each_problem(problem) -> None:
    """Newton from the library's start point at atol=1e-8: every problem but
    Freudenstein-Roth is solved by the independent check; on Freudenstein-Roth it reaches the
    local minimum of ||F|| and stops there as stalled within 60 iterations (the stall window is
    50), its best iterate returned. No claim is false, no NaN."""
    x, stats = root(problem.func, problem.x0(), solver="newton", atol=1e-8, rtol=0.0,
                    on_nonconvergence="ignore")
    ok = _check_honest(problem, x, stats)
    if problem is FREUDENSTEIN_ROTH:
        assert not ok and stats.stop_reason == "stalled" and stats.steps <= 60
        assert float(problem.func(x).norm()) < float(problem.func(problem.x0()).norm())
    else:
        assert ok and stats.all_converged and stats.stop_reason == "converged"


def test_auto_default_solves_all_23() -> None:
    """root's default (solver="auto": Newton, then ΨTC from x0 where Newton did not converge)
    solves all 23 by the independent check, claims convergence on each, and where Newton alone
    converges returns exactly Newton's x and NFE (the second stage never ran)."""
    n_solved = 0
    for problem in PROBLEMS:
        x, stats = root(problem.func, problem.x0(), atol=1e-8, rtol=0.0,
                        on_nonconvergence="ignore")
        n_solved += _check_honest(problem, x, stats)
        assert stats.method == "auto" and stats.all_converged
        if problem in (PROBLEMS[0], PROBLEMS[12]):
            nx, newton = root(problem.func, problem.x0(), solver="newton", atol=1e-8, rtol=0.0)
            assert torch.equal(nx, x) and newton.nfe == stats.nfe
    assert n_solved == 23


def test_auto_sums_both_stages_on_freudenstein_roth() -> None:
    """On Freudenstein-Roth Newton stalls and ΨTC, restarted from x0, solves it: NFE, JVPs and
    steps are the sums of the two stages run alone."""
    problem = FREUDENSTEIN_ROTH
    x, stats = root(problem.func, problem.x0(), atol=1e-8, rtol=0.0)
    _, newton = root(problem.func, problem.x0(), solver="newton", atol=1e-8, rtol=0.0,
                     on_nonconvergence="ignore")
    px, ptc = root(problem.func, problem.x0(), solver="ptc", atol=1e-8, rtol=0.0)
    assert stats.all_converged and solved(problem, x) and torch.equal(x, px)
    assert stats.nfe == newton.nfe + ptc.nfe and stats.jvps == newton.jvps + ptc.jvps
    assert stats.steps == newton.steps + ptc.steps and stats.stop_reason == "converged"
    # In a batch with a sample Newton solves, that sample keeps Newton's root exactly.
    near = torch.tensor([5.1, 3.9], dtype=torch.float64)
    xb, batch = root(problem.func, torch.stack([problem.x0(), near]), atol=1e-8, rtol=0.0)
    xn, _ = root(problem.func, near, solver="newton", atol=1e-8, rtol=0.0)
    assert batch.all_converged and solved(problem, xb[0]) and torch.equal(xb[1], xn)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["ptc", "trust_region", "anderson", "broyden"])
def test_other_solvers_never_claim_falsely(solver: str) -> None:
    """Every solver on all 23: no false claim, no NaN, and ΨTC at its defaults solves at least
    20 (SciML's PseudoTransient: 20) with no NonFiniteError; the trust region at least 19."""
    n_solved = 0
    for problem in PROBLEMS:
        try:
            x, stats = root(problem.func, problem.x0(), solver=solver, atol=1e-8, rtol=0.0,
                            on_nonconvergence="ignore")
        except FloatingPointError:
            assert solver in ("anderson", "broyden")  # F overflowed at a diverging iterate
            continue
        n_solved += _check_honest(problem, x, stats)
    assert n_solved >= {"ptc": 20, "trust_region": 19}.get(solver, 0)


def test_trust_region_stops_at_the_freudenstein_roth_minimum() -> None:
    """The dogleg trust region descends ||F||^2 into Freudenstein-Roth's local minimum
    (||F||_inf = 4.949) and the stall test stops it there, unconverged, in a few hundred
    evaluations (the issue: 1,000 iterations and 8,534 evaluations before)."""
    problem = FREUDENSTEIN_ROTH
    x, stats = root(problem.func, problem.x0(), solver="trust_region", atol=1e-8, rtol=0.0,
                    on_nonconvergence="ignore")
    _check_honest(problem, x, stats)
    assert stats.stop_reason == "stalled" and stats.nfe < 1000
    assert float(problem.func(x).abs().max()) == pytest.approx(4.949, abs=1e-3)


def test_trust_region_solves_rosenbrock() -> None:
    """The dogleg takes Newton steps where they fit: the generalized Rosenbrock problem."""
    problem = PROBLEMS[0]
    x, stats = root(problem.func, problem.x0(), solver="trust_region", atol=1e-8, rtol=0.0)
    assert _check_honest(problem, x, stats) and stats.all_converged


@pytest.mark.parametrize("solver", ["newton", "trust_region", "ptc", "auto"])
def test_batch_keeps_converged_samples(solver: str) -> None:
    """A batch of ``F(x) = x^2 + c_b`` (``c_b`` per sample, as a layer's input would be):
    samples with a real root converge and are returned converged at it, the sample without one
    (c = 1) stalls at the residual's minimum x = 0, unconverged, its best iterate returned;
    stop reason "stalled", nothing raised with on_nonconvergence="ignore"."""
    c = torch.tensor([[-1.0], [1.0], [-4.0]], dtype=torch.float64)
    x0 = torch.tensor([[3.0], [2.0], [1.0]], dtype=torch.float64)
    x, stats = root(lambda x: x * x + c, x0, solver=solver, atol=1e-10, rtol=0.0,
                    on_nonconvergence="ignore")
    assert x.shape == x0.shape
    assert stats.converged.tolist() == [True, False, True] and stats.stop_reason == "stalled"
    torch.testing.assert_close(x[[0, 2]], torch.tensor([[1.0], [2.0]], dtype=torch.float64))
    assert abs(float(x[1])) < 0.1 and float(stats.residual[1]) < 1.01


def test_nonconvergence_policies_and_best_iterate() -> None:
    """raise: ConvergenceError carrying the stats and the best iterate ``.x`` (1-D like x0);
    warn: a ConvergenceWarning; ignore: silent. The best iterate is the smallest residual
    seen, not the last."""
    problem = FREUDENSTEIN_ROTH
    with pytest.raises(ConvergenceError) as caught:
        root(problem.func, problem.x0(), solver="newton", atol=1e-8, rtol=0.0,
             on_nonconvergence="raise")
    error = caught.value
    assert error.x.shape == (2,) and error.stats.stop_reason == "stalled"
    torch.testing.assert_close(error.stats.residual, sample_rms(problem.func(error.x)[None]))
    with pytest.warns(ConvergenceWarning):
        root(problem.func, problem.x0(), solver="newton", atol=1e-8, rtol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        root(problem.func, problem.x0(), solver="newton", atol=1e-8, rtol=0.0,
             on_nonconvergence="ignore")


@pytest.mark.parametrize("first_step", [0.1, 1.0])
def test_ptc_sign_convention(first_step: float) -> None:
    """ΨTC integrates dx/dt = -F: for F(x) = A x - c with A non-normal and its eigenvalues of
    positive real part (a stable root of dx/dt = -F) it converges to the root; the same
    problem passed as -F (eigenvalues of negative real part: the root repels the flow) stalls
    and is reported so. Catches a flipped sign inside root."""
    a = torch.tensor([[1.0, 5.0], [0.0, 2.0]], dtype=torch.float64)  # non-normal, eig 1, 2
    c = torch.tensor([1.0, -1.0], dtype=torch.float64)
    x0 = torch.zeros(2, dtype=torch.float64)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return x @ a.T - c

    x, stats = root(forward, x0, solver="ptc", atol=1e-10, rtol=0.0, first_step=first_step)
    torch.testing.assert_close(x, torch.linalg.solve(a, c))
    assert stats.all_converged
    _, flipped = root(lambda x: -forward(x), x0, solver="ptc", atol=1e-10, rtol=0.0,
                      first_step=first_step, on_nonconvergence="ignore")
    assert not flipped.all_converged and flipped.stop_reason == "stalled"


def test_ptc_preconditioner_hook() -> None:
    """A right preconditioner (the exact inverse of the 1-D Laplacian step matrix, diagonal
    reaction dropped) gives the same root as unpreconditioned GMRES with fewer iterations."""
    n = 60
    h = 1.0 / (n + 1)
    lap = (torch.diag(torch.full((n,), -2.0)) + torch.diag(torch.ones(n - 1), 1)
           + torch.diag(torch.ones(n - 1), -1)).double() / h**2
    source = torch.ones(n, dtype=torch.float64)

    def F(u: torch.Tensor) -> torch.Tensor:  # -u'' + u^3 = 1: J_F = -lap + 3 diag(u^2)
        return -(u @ lap.T) + u**3 - source

    def precondition(v: torch.Tensor, z: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(n, dtype=v.dtype)
        matrices = eye / step.reshape(-1, 1, 1) - lap  # (I / h + J_F) without the cube term
        return torch.linalg.solve(matrices, v)

    x0 = torch.zeros(2, n, dtype=torch.float64)
    plain_x, plain = root(F, x0, solver="ptc", atol=1e-9, rtol=0.0)
    x, stats = root(F, x0, solver="ptc", atol=1e-9, rtol=0.0, preconditioner=precondition)
    assert plain.all_converged and stats.all_converged
    torch.testing.assert_close(x, plain_x, atol=1e-7, rtol=0.0)
    assert stats.linear_iterations < plain.linear_iterations / 3


def test_ptc_stall_and_nonfinite_policy() -> None:
    """ΨTC on x^2 + 1 = 0 (no real root): the stall test stops it as stalled at the residual's
    minimum (x = 0), on_nonconvergence honoured; never NonFiniteError for a finite F."""
    x, stats = root(lambda x: x * x + 1.0, torch.tensor([[3.0], [-2.0]], dtype=torch.float64),
                    solver="ptc", on_nonconvergence="ignore")
    assert stats.stop_reason == "stalled" and not bool(stats.converged.any())
    assert float(x.abs().max()) < 0.1 and stats.steps < 200


@pytest.mark.parametrize("solver", ["newton", "trust_region", "ptc", "anderson", "auto"])
def test_unbatched_and_batched_agree(solver: str) -> None:
    """A 1-D x0 is one system: x comes back 1-D, statistics of shape (1,); the same system in
    a batch of one gives the same x."""
    problem = PROBLEMS[16]  # Dennis-Schnabel
    start = torch.tensor([1.0, 5.0], dtype=torch.float64) if solver != "anderson" else \
        torch.tensor([0.1, 2.9], dtype=torch.float64)
    x, stats = root(problem.func, start, solver=solver, atol=1e-10, rtol=0.0,
                    on_nonconvergence="ignore", damping=0.3) if solver == "anderson" else root(
        problem.func, start, solver=solver, atol=1e-10, rtol=0.0)
    assert x.shape == (2,) and stats.converged.shape == (1,)
    xb, _ = root(problem.func, start[None], solver=solver, atol=1e-10, rtol=0.0,
                 on_nonconvergence="ignore", **({"damping": 0.3} if solver == "anderson"
                                                else {}))
    torch.testing.assert_close(xb[0], x)


def test_bad_arguments() -> None:
    """Errors name the argument."""
    f = PROBLEMS[16].func
    x0 = torch.tensor([1.0, 5.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="solver"):
        root(f, x0, solver="levenberg")
    with pytest.raises(TypeError, match="ptc"):
        root(f, x0, solver="ptc", memory=3)
    with pytest.raises(TypeError, match="newton"):
        root(f, x0, solver="newton", bogus=1)
    with pytest.raises(TypeError, match=r"auto.*bogus"):
        root(f, x0, bogus=1)
    with pytest.raises(ValueError, match="stall_window"):
        root(f, x0, stall_window=0)
    with pytest.raises(ValueError, match="min_growth"):
        PTCOptions(min_growth=0.5)
    with pytest.raises(ValueError, match="jvp"):
        PTCOptions(jvp="central")
    with pytest.raises(ValueError, match="forcing"):
        root(f, x0, solver="newton", forcing=1.5)
    with pytest.raises(ValueError, match="trust_region"):
        root(f, x0, solver="trust_region", jvp="forward")
    with pytest.raises(TypeError, match="F"):
        root(3, x0)


@pytest.mark.parametrize("solver", ["newton", "ptc", "auto"])
def test_parameters_requiring_grad(solver: str) -> None:
    """F with a parameter that requires grad: the solve runs (Jacobian products still work)
    and x comes back without autograd history."""
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    x, stats = root(lambda x: w * x - 1.0, torch.zeros(2, 3, dtype=torch.float64),
                    solver=solver, atol=1e-10, rtol=0.0)
    assert stats.all_converged and not x.requires_grad
    torch.testing.assert_close(x, torch.full((2, 3), 0.5, dtype=torch.float64))
