"""Batched restarted GMRES against dense solves."""

from __future__ import annotations

import pytest
import torch

from contdeq.solvers.gmres import gmres


def _matvec(a: torch.Tensor):
    return lambda v: torch.bmm(a, v.unsqueeze(2)).squeeze(2)


def _nonsymmetric(batch: int, dim: int) -> torch.Tensor:
    return torch.randn(batch, dim, dim, dtype=torch.float64) + 8 * torch.eye(dim,
                                                                             dtype=torch.float64)


def _ill_conditioned_spd(batch: int, dim: int, condition: float) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(batch, dim, dim, dtype=torch.float64))
    eig = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), dim, dtype=torch.float64)
    return q @ torch.diag_embed(eig.expand(batch, dim)) @ q.transpose(1, 2)


@pytest.mark.parametrize("restart", [40, 7])
def test_matches_dense_solve_nonsymmetric(restart: int) -> None:
    """Non-symmetric systems, with and without restarts: catches a wrong Givens update, a
    per-sample mix-up of Krylov spaces, or a restart that forgets the current x."""
    a = _nonsymmetric(5, 40)
    b = torch.randn(5, 40, dtype=torch.float64)
    out = gmres(_matvec(a), b, rtol=1e-10, restart=restart, max_iterations=2000)
    ref = torch.linalg.solve(a, b)
    assert bool(out.converged.all())
    torch.testing.assert_close(out.solution, ref, rtol=1e-8, atol=1e-8)
    true_res = (b - _matvec(a)(out.solution)).pow(2).mean(1).sqrt()
    torch.testing.assert_close(out.residual, true_res, rtol=0.0, atol=1e-9)
    if restart < 40:
        assert out.matvecs > restart  # the restart path ran


def test_ill_conditioned_spd() -> None:
    """Condition number 1e6: catches loss of orthogonality (no re-orthogonalisation) that
    stalls GMRES short of the tolerance or returns an inaccurate x."""
    a = _ill_conditioned_spd(3, 40, 1e6)
    b = torch.randn(3, 40, dtype=torch.float64)
    out = gmres(_matvec(a), b, rtol=1e-10, restart=40)
    ref = torch.linalg.solve(a, b)
    assert bool(out.converged.all())
    err = (out.solution - ref).norm(dim=1) / ref.norm(dim=1)
    assert float(err.max()) < 1e-5


def test_per_sample_tolerance_and_masking() -> None:
    """Sample 0 needs 1 step (A = 2I), sample 1 needs many: catches a converged sample that
    keeps taking part (its iteration count would grow) and per-sample tolerances ignored."""
    a = torch.stack([2 * torch.eye(30, dtype=torch.float64), _nonsymmetric(1, 30)[0]])
    b = torch.randn(2, 30, dtype=torch.float64)
    rtol = torch.tensor([1e-12, 1e-3], dtype=torch.float64)
    out = gmres(_matvec(a), b, rtol=rtol, restart=30)
    assert out.iterations[0].item() == 1
    assert out.iterations[1].item() > 5
    ref = torch.linalg.solve(a, b)
    torch.testing.assert_close(out.solution[0], ref[0])
    rel = (b[1] - a[1] @ out.solution[1]).norm() / b[1].norm()
    assert 1e-6 < float(rel) <= 1e-3  # stopped at its own, looser tolerance


def test_initial_guess_and_iteration_cap() -> None:
    """An exact x0 needs no Arnoldi step; a tiny cap stops unconverged and says so."""
    a = _nonsymmetric(2, 20)
    b = torch.randn(2, 20, dtype=torch.float64)
    ref = torch.linalg.solve(a, b)
    exact = gmres(_matvec(a), b, ref, rtol=1e-8)
    assert exact.matvecs == 1 and int(exact.iterations.sum()) == 0
    capped = gmres(_matvec(a), b, rtol=1e-12, max_iterations=3)
    assert not bool(capped.converged.any())
    assert capped.iterations.tolist() == [3, 3]


def test_bad_arguments() -> None:
    """Messages name the argument."""
    with pytest.raises(ValueError, match="b must be a"):
        gmres(lambda v: v, torch.ones(3))
    with pytest.raises(ValueError, match="restart"):
        gmres(lambda v: v, torch.ones(2, 3), restart=0)
    with pytest.raises(ValueError, match="rtol"):
        gmres(lambda v: v, torch.ones(2, 3), rtol=-1.0)


def test_gmres_backward_gradcheck() -> None:
    """float64 gradcheck of a DEQ layer whose implicit backward is solved by GMRES: catches a
    transposed system (J instead of J^T), a lost rescaling of v, or unflattened shapes."""
    from .test_implicit import gradcheck_layer, make_layer

    layer = make_layer("DEQ", "anderson", backward_method="gmres")
    gradcheck_layer(layer)


def test_gmres_backward_near_the_edge() -> None:
    """``(I - J)^T w = v`` with a random ``J`` of spectral radius 0.97 (width 64): GMRES meets the
    default tolerance 1e-4 in at most 60 VJPs (Anderson and Picard need more) and agrees with
    the dense implicit-function-theorem solution; catches a slow or wrong Krylov solve."""
    from contdeq.implicit import solve_adjoint

    g = torch.randn(4, 64, 64, dtype=torch.float64)
    jac = 0.97 * g / torch.linalg.eigvals(g).abs().amax(1).reshape(4, 1, 1)
    v = torch.randn(4, 64, dtype=torch.float64)
    calls = []

    def vjp(w: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return (jac * w.unsqueeze(2)).sum(1)  # w^T J

    w, stats = solve_adjoint(vjp, v, method="gmres", rtol=1e-4, on_nonconvergence="raise")
    eye = torch.eye(64, dtype=torch.float64)
    exact = torch.linalg.solve((eye - jac).transpose(1, 2), v)
    assert stats.nfe == len(calls) <= 60
    assert stats.linear_iterations == stats.steps
    err = (w - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(err.max()) < 1e-3


def _rank_deficient(batch: int, dim: int, rank: int) -> torch.Tensor:
    left = torch.randn(batch, dim, rank, dtype=torch.float64)
    right = torch.randn(batch, rank, dim, dtype=torch.float64)
    return left @ right


def test_inconsistent_singular_system_is_not_claimed() -> None:
    """The issue's ``A = [[-1, 1], [-1, 1]]``, ``b = [2, 0]`` (``b`` outside the range) beside a
    regular sample: a finite least-squares iterate (``x2 - x1 = 1``, RMS residual 1), reported
    unconverged, while the regular sample converges. Catches the breakdown read as "lucky"
    (NaN with ``converged=True``)."""
    a = torch.tensor([[[-1.0, 1.0], [-1.0, 1.0]], [[2.0, 0.0], [1.0, 3.0]]], dtype=torch.float64)
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    out = gmres(_matvec(a), b, rtol=1e-10)
    assert bool(torch.isfinite(out.solution).all())
    assert out.converged.tolist() == [False, True]
    true_res = (b - _matvec(a)(out.solution)).pow(2).mean(1).sqrt()
    torch.testing.assert_close(out.residual, true_res, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(true_res[0], torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("restart", [60, 5])
def test_rank_deficient_systems(dtype: torch.dtype, restart: int) -> None:
    """Random rank-5 systems of size 20: with ``b`` in the range GMRES converges; with a part
    outside it every sample ends finite, unconverged, its reported residual the true one and
    no larger than the least-squares optimum by much (restarts and float32 included)."""
    torch.manual_seed(0)
    a = _rank_deficient(4, 20, 5)
    consistent = _matvec(a)(torch.randn(4, 20, dtype=torch.float64))
    outside = consistent + torch.randn(4, 20, dtype=torch.float64)
    lstsq = torch.linalg.pinv(a) @ outside.unsqueeze(2)
    best = (outside - _matvec(a)(lstsq.squeeze(2))).pow(2).mean(1).sqrt()
    a_d = a.to(dtype)
    ok = gmres(_matvec(a_d), consistent.to(dtype), rtol=1e-4, restart=restart,
               max_iterations=500)
    assert bool(ok.converged.all())
    out = gmres(_matvec(a_d), outside.to(dtype), rtol=1e-6, restart=restart, max_iterations=500)
    assert bool(torch.isfinite(out.solution).all())
    assert not bool(out.converged.any())
    true_res = (outside.to(dtype) - _matvec(a_d)(out.solution)).pow(2).mean(1).sqrt()
    torch.testing.assert_close(out.residual, true_res, rtol=1e-3, atol=1e-5)
    assert bool((true_res.double() <= 1.5 * best + 1e-5).all())


def test_adjoint_gmres_on_a_singular_system() -> None:
    """The implicit backward's GMRES path on ``(I - J)^T w = v`` with ``I - J`` singular and
    ``v`` outside its range: a finite ``w``, ``stats.converged`` False, ConvergenceError raised
    when asked (never NaN passed on as a gradient)."""
    from contdeq.implicit import solve_adjoint
    from contdeq.solvers import ConvergenceError

    # I - J = [[-1, 1], [1, -1]]: singular
    jac = torch.tensor([[2.0, -1.0], [-1.0, 2.0]], dtype=torch.float64)
    v = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    w, stats = solve_adjoint(lambda w: w @ jac, v, method="gmres", rtol=1e-8,
                             on_nonconvergence="ignore")
    assert bool(torch.isfinite(w).all()) and not bool(stats.converged.any())
    with pytest.raises(ConvergenceError):
        solve_adjoint(lambda w: w @ jac, v, method="gmres", rtol=1e-8, on_nonconvergence="raise")
