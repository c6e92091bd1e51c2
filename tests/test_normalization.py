"""Weight normalizations that stay fixed during a solve: spectral_norm_cap, weight_norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import contdeq

from .layer_models import TanhCell


def spectral_norm(weight: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight.detach().reshape(weight.shape[0], -1), ord=2))


@pytest.mark.parametrize("shape", [(32, 32), (16, 48)])
def test_cap_holds_at_initialization_after_warmup(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        linear.weight.mul_(3.0 / spectral_norm(linear.weight))
    contdeq.spectral_norm_cap(linear, cap=0.9)
    assert spectral_norm(linear.weight) == pytest.approx(0.9, rel=1e-3)


def test_one_power_iteration_underestimates_without_warmup() -> None:
    """Why the warm-up exists: a single iteration from a random vector leaves the cap loose."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 64)
    with torch.no_grad():
        linear.weight.mul_(3.0 / spectral_norm(linear.weight))
    contdeq.spectral_norm_cap(linear, cap=0.9, warmup_iterations=1)
    assert spectral_norm(linear.weight) > 0.95


def test_conv_kernel_is_capped() -> None:
    conv = nn.Conv2d(4, 6, 3)
    with torch.no_grad():
        conv.weight.mul_(5.0)
    contdeq.spectral_norm_cap(conv, cap=0.5)
    assert spectral_norm(conv.weight) == pytest.approx(0.5, rel=1e-3)


def test_weight_is_fixed_between_calls_until_update() -> None:
    """f is one function during a solve, unlike torch's spectral_norm in training mode."""
    linear = contdeq.spectral_norm_cap(nn.Linear(8, 8), cap=0.5, warmup_iterations=0)
    linear.train()
    first, second = linear.weight.detach().clone(), linear.weight.detach().clone()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert contdeq.update_normalization(linear) == 1
    assert not torch.equal(linear.weight.detach(), first)  # the estimate moved on update

    torch_sn = nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8))
    torch_sn.train()
    a, b = torch_sn.weight.detach().clone(), torch_sn.weight.detach().clone()
    assert not torch.equal(a, b)  # torch's version changes on every access


def test_layer_advances_the_power_iteration_once_per_training_forward() -> None:
    f = TanhCell(6, 4, lipschitz=2.0, dtype=torch.float32, cap=0.8)
    layer = contdeq.DEQ(f, state_shape=6)
    cap = f.W.parametrizations.weight[0]
    # Start the power iteration away from its fixed point: after the construction's warm-up
    # iterations one more step may leave u unchanged to the last bit (it did for some draws).
    with torch.no_grad():
        cap.u.copy_(torch.nn.functional.normalize(torch.ones_like(cap.u), dim=0))
    u = cap.u.clone()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 4))
    assert torch.equal(cap.u, u)
    layer.train()
    layer(torch.randn(3, 4))
    assert not torch.equal(cap.u, u)


def test_skip_layer_advances_the_predictors_power_iteration() -> None:
    """A cap on a SkipDEQ's predictor (registered on the layer) advances once per training
    forward too, as the docs state for the enclosing layer (else its cap stops holding as
    training changes the predictor)."""
    predictor = contdeq.spectral_norm_cap(nn.Linear(4, 6), cap=0.8)
    layer = contdeq.SkipDEQ(TanhCell(6, 4, dtype=torch.float32), predictor)
    cap = predictor.parametrizations.weight[0]
    with torch.no_grad():  # away from the power iteration's fixed point
        cap.u.copy_(torch.nn.functional.normalize(torch.ones_like(cap.u), dim=0))
    u = cap.u.clone()
    layer(torch.randn(3, 4))
    assert not torch.equal(cap.u, u)


def test_gradient_flows_through_the_cap() -> None:
    """The raw weight's gradient through the cap equals autograd on the formula written out
    here, ``W * cap / (u^T W v)`` with the cap's buffers ``u, v`` (the cap is active, sigma
    differentiated too): catches a detached sigma, a wrongly scaled parametrization or no
    gradient at all."""
    torch.manual_seed(0)
    linear = contdeq.spectral_norm_cap(nn.Linear(5, 5), cap=0.1)
    x = torch.randn(2, 5)
    linear(x).square().sum().backward()
    grad = linear.parametrizations.weight.original.grad
    cap = linear.parametrizations.weight[0]
    weight = linear.parametrizations.weight.original.detach().clone().requires_grad_()
    sigma = cap.u @ weight @ cap.v
    assert float(sigma.detach()) > 0.1  # the cap is active
    (x @ (weight * (0.1 / sigma)).T + linear.bias.detach()).square().sum().backward()
    torch.testing.assert_close(grad, weight.grad)
    assert float(grad.abs().max()) > 0


def test_weight_norm_is_the_formula_and_deterministic() -> None:
    """weight_norm's weight is ``g * v / ||v||`` with the norm over each output row (dim=0),
    the same on every read: catches a norm over the wrong dimension, a missing g, or a
    parametrization that changes between the solver's calls of f."""
    linear = contdeq.weight_norm(nn.Linear(5, 4))
    params = linear.parametrizations.weight
    g, v = params.original0.detach(), params.original1.detach()
    assert g.shape == (4, 1)
    with torch.no_grad():
        params.original0.mul_(torch.linspace(0.5, 2.0, 4).view(4, 1))  # g no longer ||v||
    g = params.original0.detach()
    expected = g * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(linear.weight, expected)
    torch.testing.assert_close(linear.weight, linear.weight.clone(), rtol=0, atol=0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="cap must be a float > 0"):
        contdeq.spectral_norm_cap(nn.Linear(3, 3), cap=0.0)
    with pytest.raises(ValueError, match="no tensor attribute 'kernel'"):
        contdeq.spectral_norm_cap(nn.Linear(3, 3), name="kernel")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        contdeq.spectral_norm_cap(nn.Linear(3, 3), name="bias")
    for dim in (2, -3, "0", True):
        with pytest.raises(ValueError, match=r"dim must be an int in \[-2, 1\] \(a dimension of "
                                             r"the weight of shape \(3, 3\)\)"):
            contdeq.spectral_norm_cap(nn.Linear(3, 3), dim=dim)


def test_conv_operator_norm_bounded_by_the_documented_cap() -> None:
    """cap = c / sqrt(k_h k_w) on a 3x3 kernel bounds the convolution operator's norm by c."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(10.0)
    contdeq.spectral_norm_cap(conv, cap=0.9 / 3.0)
    v = torch.randn(1, 4, 12, 12)
    with torch.no_grad():
        for _ in range(200):  # power iteration on the operator
            v = nn.functional.conv_transpose2d(conv(v), conv.weight, padding=1)
            v = v / v.norm()
        operator_norm = float(conv(v).norm())
    assert 0.3 < operator_norm <= 0.9 + 1e-4
