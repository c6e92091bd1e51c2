"""fixed_point: Picard, Anderson and Broyden on known problems."""

from __future__ import annotations

import inspect

import pytest
import torch

from contdeq.solvers import (
    FIXED_POINT_METHODS,
    ConvergenceError,
    NonFiniteError,
    SolverStats,
    fixed_point,
)

from .problems import CallCounter, spd_batch, tanh_layer

METHODS = list(FIXED_POINT_METHODS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 9])
def test_contractive_linear_map(method: str, dtype: torch.dtype, batch: int) -> None:
    """g(z) = z - c (A z - b) with A SPD, c = 1/2: a contraction whose fixed point is A^-1 b."""
    a = spd_batch(batch, 6, dtype, lo=0.5, hi=2.0)
    b = torch.randn(batch, 6, dtype=dtype)

    def g(z: torch.Tensor) -> torch.Tensor:
        return z - 0.5 * (torch.bmm(a, z.unsqueeze(2)).squeeze(2) - b)

    tol = 1e-10 if dtype == torch.float64 else 1e-5
    z, stats = fixed_point(g, torch.zeros_like(b), method=method, atol=tol, rtol=0.0,
                           max_steps=500)
    z_star = torch.linalg.solve(a.double(), b.double())
    assert stats.all_converged
    # ||z - z*|| <= ||(I - J_g)^-1|| ||g(z) - z|| = 2/(0.5) * residual (RMS norms).
    err = (z.double() - z_star).pow(2).mean(1).sqrt()
    assert bool((err <= 4.0 * stats.residual.double() * 1.01 + 1e-12).all())


def _extra_calls(method: str, stats: SolverStats) -> int:
    """Calls beyond one per step and the one at ``z0``: none for the one-evaluation methods; a
    method given the map (``needs_map``, e.g. Newton's line search) reports its own, and it
    must make at least one (the graph its Jacobian-vector products run on)."""
    if not getattr(FIXED_POINT_METHODS[method], "needs_map", False):
        return 0
    extra = stats.nfe - stats.steps - 1
    assert extra >= 1, stats.summary()
    return extra


@pytest.mark.parametrize("method", METHODS)
def test_tanh_layer_and_exact_nfe(method: str) -> None:
    f, z_star = tanh_layer(32, 8, torch.float64, lipschitz=0.95)
    counter = CallCounter(f)
    z, stats = fixed_point(counter, torch.zeros_like(z_star), method=method, atol=1e-9,
                           rtol=0.0, max_steps=1000)
    assert stats.all_converged
    assert stats.nfe == counter.calls == stats.steps + 1 + _extra_calls(method, stats)
    assert float((z - z_star).abs().max()) < 1e-7


@pytest.mark.parametrize("method", ["anderson", "broyden"])
def test_accelerated_methods_beat_picard_on_slow_map(method: str) -> None:
    """A linear map with spectral radius 0.98: Picard needs hundreds of steps."""
    a = spd_batch(4, 10, torch.float64, lo=0.02, hi=1.0)
    b = torch.randn(4, 10, dtype=torch.float64)

    def g(z: torch.Tensor) -> torch.Tensor:
        return z - (torch.bmm(a, z.unsqueeze(2)).squeeze(2) - b)

    _, picard = fixed_point(g, torch.zeros_like(b), method="picard", atol=1e-8, rtol=0.0,
                            max_steps=5000)
    _, fast = fixed_point(g, torch.zeros_like(b), method=method, atol=1e-8, rtol=0.0,
                          max_steps=5000)
    assert picard.all_converged and fast.all_converged
    assert fast.nfe < picard.nfe / 3


@pytest.mark.parametrize("method", METHODS)
def test_converged_samples_stay_put(method: str) -> None:
    """Sample 0 is already at its fixed point; sample 1 needs many iterations."""
    scale = torch.tensor([[0.0], [0.9]], dtype=torch.float64)
    c = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)

    def g(z: torch.Tensor) -> torch.Tensor:
        return scale * z + c

    z0 = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    z, stats = fixed_point(g, z0, method=method, atol=1e-10, rtol=0.0, max_steps=1000)
    assert stats.all_converged
    assert torch.equal(z[0], z0[0])
    assert torch.allclose(z[1], c[1] / 0.1, atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_image_shaped_state(method: str) -> None:
    """A (B, C, H, W) state: the returned z is a fixed point of the conv map, its residual
    recomputed here (RMS over C, H, W per sample) below atol, and the stats report that
    residual: catches a state flattened over the wrong dimensions or a claimed convergence."""
    conv = torch.nn.Conv2d(2, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(0.5 / conv.weight.abs().sum(dim=(1, 2, 3)).max())
    x = torch.randn(3, 2, 4, 5)
    with torch.no_grad():
        z, stats = fixed_point(lambda z: torch.tanh(conv(z) + x), torch.zeros_like(x),
                               method=method, atol=1e-6, rtol=0.0)
    assert z.shape == x.shape and stats.all_converged
    with torch.no_grad():
        residual = (torch.tanh(conv(z) + x) - z).pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert float(residual.max()) <= 1e-6
    torch.testing.assert_close(stats.residual, residual, rtol=1e-4, atol=1e-9)


def test_returns_best_iterate_on_nonconvergence() -> None:
    """An expansive map: the returned iterate is the one with the smallest residual."""
    g = lambda z: 1.5 * z + 1.0  # noqa: E731
    z, stats = fixed_point(g, torch.zeros(2, 3), method="picard", max_steps=5,
                           on_nonconvergence="ignore")
    assert not stats.converged.any()
    assert torch.allclose(stats.residual, (g(z) - z).pow(2).mean(1).sqrt())
    assert torch.equal(z, torch.zeros(2, 3))  # the start had the smallest residual


def test_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="memroy"):
        fixed_point(lambda z: 0.5 * z, torch.ones(2, 2), method="anderson", memroy=3)


@pytest.mark.parametrize(
    ("options", "match"),
    [({"damping": 0.0}, "damping"), ({"damping": 1.5}, "damping"), ({"memory": 0}, "memory"),
     ({"regularization": -1.0}, "regularization")],
)
def test_bad_method_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fixed_point(lambda z: 0.5 * z, torch.ones(2, 2), method="anderson", **options)


@pytest.mark.parametrize("method", METHODS)
def test_damped_variants_converge(method: str) -> None:
    f, z_star = tanh_layer(16, 4, torch.float64)
    takes_damping = "damping" in inspect.signature(FIXED_POINT_METHODS[method]).parameters
    options = {"damping": 0.7} if takes_damping else {}
    z, stats = fixed_point(f, torch.zeros_like(z_star), method=method, atol=1e-9, rtol=0.0,
                           max_steps=500, **options)
    assert stats.all_converged
    assert float((z - z_star).abs().max()) < 1e-7


@pytest.mark.parametrize("method", METHODS)
def test_iterating_together_matches_per_sample_freezing(method: str) -> None:
    """freeze_converged=False: every sample iterates until all have converged; same fixed
    point, exact NFE, the stats of the last iterate, residual history per step."""
    f, z_star = tanh_layer(32, 8, torch.float64, lipschitz=0.95)
    z0 = torch.zeros_like(z_star)
    z0[0] = z_star[0]  # converged from the start: iterating it further must not hurt it
    counter = CallCounter(f)
    z, stats = fixed_point(counter, z0, method=method, atol=1e-9, rtol=0.0, max_steps=1000,
                           freeze_converged=False, record_trajectory=True)
    assert stats.all_converged and stats.stop_reason == "converged"
    assert stats.nfe == counter.calls == stats.steps + 1 + _extra_calls(method, stats)
    assert stats.residual_history.shape == (stats.steps + 1, 8)
    torch.testing.assert_close(stats.residual, (f(z) - z).pow(2).mean(1).sqrt())
    assert float((z - z_star).abs().max()) < 1e-7
    z_frozen, _ = fixed_point(f, z0, method=method, atol=1e-9, rtol=0.0, max_steps=1000)
    assert float((z - z_frozen).abs().max()) < 1e-7


def test_iterating_together_reports_nonconvergence_and_non_finite_values() -> None:
    f, z_star = tanh_layer(16, 4, torch.float64, lipschitz=0.95)
    with pytest.raises(ConvergenceError):
        fixed_point(f, torch.zeros_like(z_star), method="picard", atol=1e-12, rtol=0.0,
                    max_steps=3, freeze_converged=False, on_nonconvergence="raise")
    calls = CallCounter(lambda z: z * 2.0 + 1e308)  # overflows to inf on the second step
    with pytest.raises(NonFiniteError):
        fixed_point(calls, torch.zeros(3, 2, dtype=torch.float64), method="picard",
                    freeze_converged=False)
    with pytest.raises(NonFiniteError):  # NaN in one sample only
        fixed_point(lambda z: torch.where(z > 0.5, torch.nan, 0.9 * z + 0.1),
                    torch.tensor([[0.0], [0.45]], dtype=torch.float64), method="picard",
                    atol=1e-12, rtol=0.0, freeze_converged=False)
    with pytest.raises(TypeError, match="freeze_converged must be a bool"):
        fixed_point(f, torch.zeros_like(z_star), freeze_converged=1)


@pytest.mark.parametrize("damping", [1.0, 0.6])
def test_anderson_mixing_paths_agree(damping: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broadcast and the batched-matmul weighted sums give the same iterates."""
    from contdeq.solvers import anderson

    f, z_star = tanh_layer(300, 3, torch.float64)
    runs = []
    for limit in (0, 10_000):  # every state on the bmm path, then every one broadcast
        monkeypatch.setattr(anderson, "_BROADCAST_MIX_MAX_FEATURES", limit)
        runs.append(fixed_point(f, torch.zeros_like(z_star), method="anderson", atol=1e-10,
                                rtol=0.0, damping=damping, record_trajectory=True))
    (z_bmm, s_bmm), (z_bc, s_bc) = runs
    assert s_bmm.all_converged and s_bmm.nfe == s_bc.nfe
    assert torch.allclose(z_bmm, z_bc, rtol=0.0, atol=1e-12)
    assert torch.allclose(s_bmm.residual_history, s_bc.residual_history, rtol=1e-9, atol=1e-14)
