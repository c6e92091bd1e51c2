"""steady_state: correctness on known problems, NFE accounting, per-sample freezing."""

from __future__ import annotations

import math

import pytest
import torch

from contdeq.solvers import STEADY_STATE_METHODS, NonFiniteError, steady_state
from contdeq.solvers.torchdiffeq_backend import TORCHDIFFEQ_FSAL_METHODS

from .problems import CallCounter, linear_ode, spd_batch, tanh_layer

LEAN = [(m, "lean") for m in STEADY_STATE_METHODS]
TORCHDIFFEQ = [(m, "torchdiffeq") for m in TORCHDIFFEQ_FSAL_METHODS]
EVENT = [(m, "event") for m in ("dopri5", "bosh3")]
ALL = LEAN + TORCHDIFFEQ + EVENT


@pytest.mark.parametrize(("method", "backend"), ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_steady_state(method: str, backend: str, dtype: torch.dtype) -> None:
    a = spd_batch(6, 5, dtype)
    b = torch.randn(6, 5, dtype=dtype)
    func, z_star = linear_ode(a, b)
    tol = 1e-5 if dtype == torch.float64 else 1e-4
    # odeint_event stops on the interpolated crossing residual == tolerance, which bisection
    # locates only approximately: allow it 5% over the tolerance.
    slack = 1.05 if backend == "event" else 1.0
    z, stats = steady_state(func, torch.zeros_like(b), method=method, atol=tol, rtol=tol,
                            backend=backend, max_steps=5000,
                            on_nonconvergence="ignore" if backend == "event" else "warn")
    assert bool((stats.residual <= slack * stats.tolerance).all())
    # ||z - z*|| <= ||A^-1|| ||dz/dt|| <= 2 * tolerance (eigenvalues of A >= 0.5); RMS norms.
    err = (z - z_star).pow(2).mean(1).sqrt()
    assert bool((err <= 2.0 * slack * stats.tolerance * 1.01).all()), (err, stats.tolerance)
    assert z.dtype == dtype and z.shape == b.shape


@pytest.mark.parametrize(("method", "backend"), LEAN + TORCHDIFFEQ)
def test_nfe_is_exact(method: str, backend: str) -> None:
    f, _ = tanh_layer(16, 8, torch.float64)
    counter = CallCounter(lambda t, z: f(z) - z)
    _, stats = steady_state(counter, torch.zeros(8, 16, dtype=torch.float64), method=method,
                            backend=backend, max_steps=5000)
    assert stats.nfe == counter.calls > 1


def test_nfe_is_exact_event() -> None:
    f, _ = tanh_layer(16, 8, torch.float64)
    counter = CallCounter(lambda t, z: f(z) - z)
    _, stats = steady_state(counter, torch.zeros(8, 16, dtype=torch.float64), backend="event",
                            on_nonconvergence="ignore")
    assert stats.nfe == counter.calls


@pytest.mark.parametrize(("method", "backend"), LEAN + TORCHDIFFEQ)
def test_tanh_layer_against_reference(method: str, backend: str) -> None:
    f, z_star = tanh_layer(32, 10, torch.float64)
    tol = 1e-5 if method == "adaptive_heun" else 1e-8  # 2nd order: tight tolerances cost 1e5 steps
    z, stats = steady_state(lambda t, z: f(z) - z, torch.zeros_like(z_star), method=method,
                            backend=backend, atol=tol, rtol=tol, max_steps=20000)
    assert stats.all_converged
    # f is a 0.9-contraction: ||z - z*|| <= ||f(z) - z|| / (1 - 0.9).
    assert float((z - z_star).abs().max()) <= 10 * float(stats.residual.max()) * math.sqrt(32)


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "ptc"])
def test_image_shaped_state(batch: int, method: str) -> None:
    """A (B, C, H, W) state with a convolutional map converges per sample."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(0.5 / conv.weight.abs().sum(dim=(1, 2, 3)).max())
    x = torch.randn(batch, 3, 5, 6)
    with torch.no_grad():
        z, stats = steady_state(lambda t, z: torch.tanh(conv(z) + x) - z, torch.zeros_like(x),
                                method=method, atol=1e-6, rtol=1e-6)
        residual = torch.tanh(conv(z) + x) - z
    assert z.shape == x.shape
    assert stats.converged.shape == (batch,)
    assert stats.all_converged
    assert torch.allclose(residual.pow(2).flatten(1).mean(1).sqrt(), stats.residual, atol=1e-7)


@pytest.mark.parametrize(("method", "backend"), LEAN + TORCHDIFFEQ)
def test_fast_samples_freeze_and_do_not_drift(method: str, backend: str) -> None:
    """Fast samples converge first; their returned state is where they converged."""
    rates = torch.tensor([2.0, 2.0, 0.05, 0.05], dtype=torch.float64).unsqueeze(1)
    target = torch.tensor([[1.0, -1.0], [2.0, 0.5], [1.0, 3.0], [-2.0, 1.0]], dtype=torch.float64)

    def func(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return rates * (target - z)

    z, stats = steady_state(func, torch.zeros_like(target), method=method, backend=backend,
                            atol=1e-6, rtol=1e-6, max_steps=20000)
    assert stats.all_converged
    t_final = stats.t_final
    assert t_final is not None
    assert float(t_final[:2].max()) < float(t_final[2:].min())
    # Drift after freezing would make the recomputed residual differ from the recorded one.
    recomputed = func(None, z).pow(2).mean(1).sqrt()
    assert torch.allclose(recomputed, stats.residual, rtol=1e-10, atol=1e-14)
    assert bool((stats.residual <= stats.tolerance).all())


def test_ptc_needs_fewer_evaluations_than_dopri5() -> None:
    f, _ = tanh_layer(64, 32, torch.float64, lipschitz=0.95)
    func = lambda t, z: f(z) - z  # noqa: E731
    z0 = torch.zeros(32, 64, dtype=torch.float64)
    _, ptc = steady_state(func, z0, method="ptc")
    _, dopri5 = steady_state(func, z0, method="dopri5")
    assert ptc.all_converged and dopri5.all_converged
    assert ptc.nfe < dopri5.nfe


def test_ptc_stabilises_a_map_picard_cannot() -> None:
    """f(z) = -1.5 z + c: Picard diverges (|-1.5| > 1) but dz/dt = f - z is stable."""
    c = torch.ones(3, 4, dtype=torch.float64)
    func = lambda t, z: (-1.5 * z + c) - z  # noqa: E731
    z, stats = steady_state(func, torch.zeros_like(c), method="ptc", atol=1e-8, rtol=1e-8)
    assert stats.all_converged
    assert torch.allclose(z, c / 2.5, atol=1e-7)
    assert stats.rejected is not None and stats.rejected > 0


def test_fsal_terminator_beats_odeint_event() -> None:
    f, _ = tanh_layer(32, 16, torch.float64)
    func = lambda t, z: f(z) - z  # noqa: E731
    z0 = torch.zeros(16, 32, dtype=torch.float64)
    _, lean = steady_state(func, z0, method="dopri5")
    _, event = steady_state(func, z0, method="dopri5", backend="event",
                            on_nonconvergence="ignore")
    assert lean.nfe < event.nfe


def test_first_step_rule_saves_evaluations_over_torchdiffeq_default() -> None:
    """With z0 = 0 Hairer's rule (torchdiffeq's) starts near 1e-6; ours near the time scale."""
    from torchdiffeq._impl.misc import _rms_norm, _select_initial_step

    f, _ = tanh_layer(32, 16, torch.float64)
    func = lambda t, z: f(z) - z  # noqa: E731
    z0 = torch.zeros(16, 32, dtype=torch.float64)
    hairer = float(_select_initial_step(func, torch.tensor(0.0, dtype=torch.float64), z0, 4,
                                        1e-5, 1e-5, _rms_norm))
    _, default = steady_state(func, z0)
    _, with_hairer = steady_state(func, z0, first_step=hairer)
    assert default.nfe < with_hairer.nfe


def test_recorded_trajectory_is_monotone_in_time() -> None:
    f, _ = tanh_layer(16, 4, torch.float64)
    _, stats = steady_state(lambda t, z: f(z) - z, torch.zeros(4, 16, dtype=torch.float64),
                            record_trajectory=True)
    assert stats.residual_history is not None and stats.time_history is not None
    assert stats.residual_history.shape == (stats.accepted + 1, 4)
    assert bool((stats.time_history.diff(dim=0) >= 0).all())
    assert torch.equal(stats.residual_history[-1], stats.residual)


def test_gradients_flow_through_lean_steps_under_autograd() -> None:
    """With grad enabled the lean stepper is differentiable (used for unrolled backprop)."""
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    c = torch.ones(2, 3, dtype=torch.float64)
    z, _ = steady_state(lambda t, z: w * z + c - z, torch.zeros_like(c), atol=1e-9, rtol=1e-9)
    z.sum().backward()
    # z* = c / (1 - w); d(sum z*)/dw = sum c / (1 - w)^2 = 6 / 0.25.
    assert w.grad is not None
    assert abs(float(w.grad) - 24.0) < 1e-4


def test_event_backend_does_not_call_func_again_once_bisection_stops_moving() -> None:
    """odeint_event bisects the crossing to a time tolerance equal to the integrator's atol,
    ``1e-38`` for a relative test (``atol=0``): about 127 halvings, most of them below float64's
    resolution, where the midpoint repeats an end. Those repeats cost no call of ``func`` (the
    solve took 205 event calls here before, 120 now), and the state is the same."""
    torch.manual_seed(0)
    w = torch.randn(8, 8)
    w = 0.5 * w / torch.linalg.matrix_norm(w, 2)
    x = torch.randn(4, 8)
    calls = {"n": 0}

    def func(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return torch.tanh(z @ w.T + x) - z

    z, stats = steady_state(func, torch.zeros(4, 8), method="bosh3", backend="event", atol=0.0,
                            rtol=1e-4, max_steps=100)
    assert stats.all_converged and stats.nfe == calls["n"]
    # at most 64 distinct float64 midpoints on top of the steps (bounded by max_steps)
    assert stats.steps <= 100 + 64, stats.steps
    lean, _ = steady_state(func, torch.zeros(4, 8), method="bosh3", atol=0.0, rtol=1e-4)
    torch.testing.assert_close(z, lean, atol=1e-3, rtol=0)


def test_torchdiffeq_backend_raises_when_its_own_evaluation_at_z0_is_nan() -> None:
    """The torchdiffeq loop evaluates ``func`` at ``z0`` once more; NaN there raises even when
    ``z0`` already meets the tolerance and no step follows (it passed silently)."""
    calls = {"n": 0}

    def func(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        out = 1e-3 * torch.ones_like(z)
        return out if calls["n"] == 1 else torch.full_like(z, float("nan"))

    with pytest.raises(NonFiniteError, match="torchdiffeq's own evaluation"):
        steady_state(func, torch.zeros(3, 2), method="dopri5", backend="torchdiffeq",
                     atol=1e-2, rtol=1e-2)
    assert calls["n"] == 2
