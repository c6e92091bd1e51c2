"""torch.func through the equilibrium layers: grad, vjp, vmap, jacrev, against the ordinary
autograd path and a dense implicit-function-theorem reference (float64); double backward is
refused with a clear error."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import contdeq
from contdeq.implicit import DoubleBackwardError

TIGHT = {"atol": 1e-12, "rtol": 1e-12, "backward_rtol": 1e-12, "backward_max_steps": 300}


class Cell(nn.Module):
    """``f(z, x) = tanh(W z + U x + b)``, ``W`` capped at spectral norm 0.8 (parametrized:
    its parameter is ``lin.parametrizations.weight.original``, its power-iteration vectors
    are buffers)."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.lin = contdeq.spectral_norm_cap(nn.Linear(d, d, dtype=torch.float64), cap=0.8)
        self.inp = nn.Linear(d, d, dtype=torch.float64)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(z) + self.inp(x))


def layer(solver: str = "anderson") -> contdeq.DEQ:
    return contdeq.DEQ(Cell(), solver=solver, **TIGHT).eval()  # eval: no power-iteration step


def dense_weights(f: nn.Module, z: Tensor, x: Tensor, v: Tensor) -> Tensor:
    """``w_b = (I - J_b)^-T v_b`` per sample with the dense Jacobian ``J_b = df/dz`` at ``z*``."""
    ws = []
    for zb, xb, vb in zip(z, x, v, strict=True):
        jac = torch.autograd.functional.jacobian(lambda q, xb=xb: f(q[None], xb[None])[0], zb)
        ws.append(torch.linalg.solve((torch.eye(len(zb), dtype=z.dtype) - jac).T, vb))
    return torch.stack(ws)


def dense_parameter_gradients(model: contdeq.DEQ, x: Tensor) -> dict[str, Tensor]:
    """Gradients of ``sum(z*^2)`` w.r.t. ``f``'s parameters by the dense implicit function
    theorem: ``w^T df/dtheta`` with ``w`` from a dense linear solve."""
    with torch.no_grad():
        z = model(x)
    w = dense_weights(model.f, z, x, 2 * z)
    names, params = zip(*model.f.named_parameters(), strict=True)
    grads = torch.autograd.grad(model.f(z, x), params, w)
    return {f"f.{n}": g for n, g in zip(names, grads, strict=True)}


def test_func_grad_over_parameters_matches_autograd_and_dense_ift() -> None:
    """``torch.func.grad`` of ``functional_call(layer, params, x)`` over the parameters (the
    usual functional training pattern) equals the autograd path and the dense IFT gradient.
    Catches: a missing ``setup_context``, a forward solving with the transform's wrapped
    tensors, a backward ignoring the parameters passed by the transform (zero or stale grads)."""
    model = layer()
    x = torch.randn(3, 4, dtype=torch.float64)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss(p: dict[str, Tensor]) -> Tensor:
        return functional_call(model, p, (x,)).pow(2).sum()

    got = torch.func.grad(loss)(params)
    model.zero_grad()
    model(x).pow(2).sum().backward()
    dense = dense_parameter_gradients(model, x)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(got[name], dense[name], atol=1e-9, rtol=1e-7)


def test_func_grad_uses_the_parameters_it_is_given() -> None:
    """Parameters passed to ``functional_call`` that differ from the module's own give the
    gradient at those parameters (the dense IFT gradient of a model holding them). Catches a
    forward or backward that silently reads the module's own weights."""
    model = layer()
    x = torch.randn(3, 4, dtype=torch.float64)
    other = {n: p.detach() * 0.7 for n, p in model.named_parameters()}
    got = torch.func.grad(lambda p: functional_call(model, p, (x,)).pow(2).sum())(other)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(other[n])
    dense = dense_parameter_gradients(model, x)
    for name in other:
        torch.testing.assert_close(got[name], dense[name], atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("solver", ["ode", "anderson"])
def test_func_vjp_of_input_matches_dense_ift(solver: str) -> None:
    """``torch.func.vjp`` of ``z*(x)`` with a random cotangent equals ``w^T df/dx`` with the
    dense ``w``, for the ODE and a fixed-point forward solver. Catches a wrong or missing
    input gradient in the transform path."""
    model = layer(solver)
    x = torch.randn(3, 4, dtype=torch.float64)
    v = torch.randn(3, 4, dtype=torch.float64)
    z, pull = torch.func.vjp(model, x)
    (got,) = pull(v)
    w = dense_weights(model.f, z.detach(), x, v)
    xr = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(model.f(z.detach(), xr), xr, w)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-7)


def test_func_jacrev_matches_gradcheck_verified_autograd_jacobian() -> None:
    """``torch.func.jacrev`` of ``z*(x)`` (vmap over vjp: the backward's adjoint solve runs
    under vmap) equals the Jacobian of the ordinary autograd path, which gradcheck verifies
    against finite differences. Catches a vmap rule that mixes up samples or the map index."""
    model = contdeq.DEQ(Cell(3), solver="anderson", **TIGHT).eval()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)
    got = torch.func.jacrev(model)(x.detach())
    expected = torch.autograd.functional.jacobian(model, x.detach())
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-7)
    assert got[0, :, 1].abs().max() == 0  # samples are independent: no cross-sample terms


def test_vmap_forward_and_per_sample_gradients_match_a_loop() -> None:
    """``vmap`` over inputs ``(N, B, D)`` (folded into one solve) gives each map index's own
    equilibrium, and ``vmap(grad)`` the per-sample parameter gradients of a Python loop.
    Catches folding in the wrong order (map index and batch swapped) and summed gradients."""
    model = layer()
    xs = torch.randn(3, 2, 4, dtype=torch.float64)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    z = torch.func.vmap(model)(xs)
    with torch.no_grad():
        torch.testing.assert_close(z, torch.stack([model(x) for x in xs]), atol=1e-10,
                                   rtol=0)

    def loss(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, p, (x,)).pow(2).sum()

    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    for i, x in enumerate(xs):
        expected = torch.func.grad(loss)(params, x)
        for name in params:
            torch.testing.assert_close(got[name][i], expected[name], atol=1e-9, rtol=1e-7)


def test_vmap_over_parameters_is_refused_with_a_clear_error() -> None:
    """Mapping over ``f``'s parameters (a model ensemble) raises naming the limitation instead
    of silently solving one ``f``."""
    model = layer()
    x = torch.randn(2, 4, dtype=torch.float64)
    stacked = {n: torch.stack([p.detach(), p.detach() * 0.5]) for n, p in
               model.named_parameters()}
    with pytest.raises(NotImplementedError, match="vmap over f's parameters"):
        torch.func.vmap(lambda p: functional_call(model, p, (x,)))(stacked)


def test_double_backward_raises_a_clear_error() -> None:
    """A second derivative (``create_graph=True`` then differentiating again, and
    ``torch.func`` grad of grad) raises :class:`DoubleBackwardError` naming the limitation and
    the alternative, instead of torch's "not used in the graph" or a silently wrong zero."""
    model = layer()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(DoubleBackwardError, match="backward='unrolled'"):
        torch.autograd.grad(g.sum(), x)
    first = torch.func.grad(lambda x: model(x).pow(2).sum())
    with pytest.raises(DoubleBackwardError, match="double backward"):
        torch.func.grad(lambda x: first(x).sum())(x.detach())


def test_unrolled_mode_supports_double_backward() -> None:
    """The documented alternative works: with ``backward="unrolled"`` the second derivative
    matches finite differences (gradgradcheck)."""
    model = contdeq.DEQ(Cell(), solver="picard", backward="unrolled", atol=1e-10, rtol=1e-10,
                        max_steps=200).eval()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(model, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)
