"""NeuralSDE (torchsde) and NoisyDEQ (noise-injected training of continuous DEQs)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import contdeq
from tests.layer_models import TanhCell

F64 = torch.float64


class ConstantNoise(nn.Module):
    """``g(z, x) = sigma`` (a learnable scalar)."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = nn.Parameter(torch.tensor(sigma, dtype=F64))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.sigma * torch.ones_like(z)


class Zero(nn.Module):
    """``f(z, x) = 0``: the drift is ``-z`` (an Ornstein-Uhlenbeck process)."""

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(z)


def test_eval_mode_is_explicit_euler_of_the_drift() -> None:
    """In eval mode the layer is deterministic and equals explicit Euler on
    dz/dt = f(z, x) - z with the same dt, and leaves the global random state alone: catches a
    wrong drift (sign, missing -z), noise leaking into eval, or a consumed RNG."""
    f = TanhCell(4, 3)
    layer = contdeq.NeuralSDE(f, ConstantNoise(0.5), 1.0, dt=0.25, state_shape=4).eval()
    x = torch.randn(5, 3, dtype=F64)
    state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()  # noqa: NPY002
    with torch.no_grad():
        out = layer(x)
    assert torch.equal(state, torch.get_rng_state())
    assert (np_state == np.random.get_state()[1]).all()  # noqa: NPY002
    z = torch.zeros(5, 4, dtype=F64)
    with torch.no_grad():
        for _ in range(4):
            z = z + 0.25 * (f(z, x) - z)
    torch.testing.assert_close(out, z)


def test_training_mode_has_the_ornstein_uhlenbeck_variance() -> None:
    """With f = 0 and constant sigma, z(T) from 0 has variance sigma^2 (1 - e^{-2T}) / 2 (up to
    the Euler-Maruyama bias, small at dt = 0.01): catches noise scaled by dt instead of
    sqrt(dt), or a missing diffusion."""
    sigma, t_end = 0.8, 1.0
    layer = contdeq.NeuralSDE(Zero(), ConstantNoise(sigma), t_end, dt=0.01, state_shape=1)
    x = torch.zeros(4000, 1, dtype=F64)
    with torch.no_grad():
        z = layer(x)
    expected = sigma**2 * (1 - math.exp(-2 * t_end)) / 2
    assert abs(float(z.var()) - expected) < 0.08 * expected
    assert abs(float(z.mean())) < 4 * math.sqrt(expected / 4000)


def test_adjoint_gradients_match_backpropagation() -> None:
    """With the same Brownian path (same torch seed), torchsde's stochastic adjoint (reversible
    Heun, algebraically reversible) gives the gradients of backpropagation through the steps,
    for x and for f's and g's parameters: catches parameters missing from adjoint_params."""
    f = TanhCell(3, 3)
    g = ConstantNoise(0.3)
    x = torch.randn(4, 3, dtype=F64)
    grads = []
    for adjoint in (False, True):
        layer = contdeq.NeuralSDE(f, g, 0.5, dt=0.05, method="reversible_heun",
                                  sde_type="stratonovich", adjoint=adjoint)
        xr = x.clone().requires_grad_(True)
        torch.manual_seed(3)  # fixes the Brownian path
        out = layer(xr)
        params = [xr, *f.parameters(), g.sigma]
        grads.append(torch.autograd.grad(out.square().sum(), params))
    # Measured agreement ~2e-5 (the adjoint re-queries the Brownian interval backward in
    # time); a missing parameter or a wrong path would differ at O(1).
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert float(grads[0][-1].abs()) > 1e-3  # the noise scale is trained


def test_training_forward_advances_the_caps_of_f_and_g() -> None:
    """spectral_norm_cap's power iteration is advanced once per training forward in the
    diffusion g as in the drift f (else g's cap stops holding as training changes g)."""
    f, g = TanhCell(4, 4, lipschitz=2.0, cap=0.8), TanhCell(4, 4, lipschitz=2.0, cap=0.8)
    layer = contdeq.NeuralSDE(f, g, 0.5, dt=0.1)
    caps = [m.W.parametrizations.weight[0] for m in (f, g)]
    with torch.no_grad():  # away from the power iteration's fixed point
        for cap in caps:
            cap.u.copy_(torch.nn.functional.normalize(torch.ones_like(cap.u), dim=0))
    before = [cap.u.clone() for cap in caps]
    layer(torch.randn(3, 4, dtype=F64))
    assert all(not torch.equal(cap.u, u) for cap, u in zip(caps, before, strict=True))


def test_adjoint_uses_the_normalization_of_its_forward() -> None:
    """The stochastic adjoint of a call differentiates the f and g its forward integrated, also
    when another training forward advanced spectral_norm_cap's power iteration in between."""
    torch.manual_seed(0)
    f, g = TanhCell(4, 4, lipschitz=2.0), TanhCell(4, 4, lipschitz=2.0)
    for cell in (f, g):
        contdeq.spectral_norm_cap(cell.W, cap=0.5, warmup_iterations=1)  # far from converged
    x1, x2 = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    grads = []
    for interleaved in (False, True):
        layer = contdeq.NeuralSDE(copy.deepcopy(f), copy.deepcopy(g), 0.5, dt=0.05,
                                  method="reversible_heun", sde_type="stratonovich",
                                  adjoint=True)
        torch.manual_seed(3)  # fixes the Brownian path
        loss = layer(x1).square().sum()
        if interleaved:
            layer(x2)  # advances the power iteration
        grads.append(torch.autograd.grad(loss, list(layer.parameters())))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "rk4"}, "method must be one of"),
    ({"method": "reversible_heun"}, "for sde_type='ito'"),
    ({"sde_type": "ito2"}, "sde_type must be one of"),
    ({"dt": 2.0}, "dt must be at most"),
    ({"dt": 0.0}, "dt must be"),
])
def test_neural_sde_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    """Each bad option raises a ValueError naming it: catches options torchsde would reject
    late or ignore."""
    with pytest.raises(ValueError, match=message):
        contdeq.NeuralSDE(TanhCell(3, 3), ConstantNoise(0.1), 1.0, **kwargs)


def noisy_deq() -> type:
    """The deprecated ``contdeq.NoisyDEQ`` (its access warns)."""
    with pytest.warns(DeprecationWarning, match="NoisyDEQ is deprecated"):
        return contdeq.NoisyDEQ


def test_noisy_deq_access_warns_and_names_the_replacements() -> None:
    """``contdeq.NoisyDEQ``, ``contdeq.nn.NoisyDEQ`` and ``from contdeq import NoisyDEQ``
    warn, naming DEQ and NeuralSDE; the name left the public lists: catches a removal
    without a deprecation path or a warning that does not say what to use."""
    for access in (lambda: contdeq.NoisyDEQ, lambda: contdeq.nn.NoisyDEQ):
        with pytest.warns(DeprecationWarning, match="contdeq.DEQ .*contdeq.NeuralSDE"):
            assert access() is contdeq.nn.noisy.NoisyDEQ
    with pytest.warns(DeprecationWarning, match="deprecated"):
        from contdeq import NoisyDEQ  # noqa: F401
    assert "NoisyDEQ" not in contdeq.__all__ and "NoisyDEQ" not in contdeq.nn.__all__


def test_noisy_deq_equals_the_deq_and_its_gradient() -> None:
    """Training from a noisy start reaches the same equilibrium and the same implicit
    gradient as the plain DEQ (contractive f: the start does not matter), and eval mode is
    the plain DEQ exactly: catches noise leaking into the equilibrium or the graph."""
    f = TanhCell(4, 3, lipschitz=0.5)
    options = {"state_shape": 4, "atol": 1e-9, "rtol": 1e-9, "backward_rtol": 1e-10}
    noisy = noisy_deq()(f, noise=0.5, noise_time=2.0, **options)
    plain = contdeq.DEQ(f, **options)
    x = torch.randn(6, 3, dtype=F64)
    out, ref = noisy(x), plain(x)
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-8)
    g_noisy = torch.autograd.grad(out.square().sum(), list(f.parameters()))
    g_plain = torch.autograd.grad(ref.square().sum(), list(f.parameters()))
    for a, b in zip(g_noisy, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    noisy.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(noisy(x), plain(x))


def test_noisy_deq_starts_from_a_noisy_state_in_training_only() -> None:
    """The training start is the zero state moved along a noisy trajectory (for f = 0: an
    Ornstein-Uhlenbeck sample, spread ~ sigma sqrt(T)), the eval start is zeros: catches a
    noise term that is never applied or applied in eval."""
    layer = noisy_deq()(Zero(), noise=1.0, noise_time=1.0, noise_dt=0.05, state_shape=2)
    x = torch.zeros(2000, 2, dtype=F64)
    spreads = []
    for _ in range(4):
        z, _ = layer.initial_state(x, None)
        spreads.append(float(z.std()))
    assert max(spreads) > 0.2
    layer.eval()
    z, _ = layer.initial_state(x, None)
    assert torch.equal(z, torch.zeros_like(z))


def test_noise_with_a_discrete_solver_is_refused() -> None:
    """noise needs the continuous dynamics: solver='anderson' raises naming solver='ode';
    a negative noise raises naming noise: catches silently ignored noise."""
    with pytest.raises(ValueError, match="solver='ode'"):
        noisy_deq()(TanhCell(3, 3), noise=0.1, solver="anderson")
    with pytest.raises(ValueError, match="noise must be"):
        noisy_deq()(TanhCell(3, 3), noise=-0.1)
