"""Implicit gradients: gradcheck, agreement with unrolled backprop, memory, backward solve."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.func import functional_call

import contdeq
from contdeq.implicit import BACKWARD_METHODS, FORWARD_SOLVERS, solve_adjoint
from contdeq.solvers import ConvergenceError, ConvergenceWarning

from .layer_models import TanhCell

TIGHT = {"atol": 1e-12, "rtol": 1e-12}
#: Every registered forward solver; the slow ones get more steps.
SOLVERS = {name: {"solver": name, "max_steps": {"ode": 5000, "picard": 500}.get(name, 200),
                  **TIGHT} for name in FORWARD_SOLVERS}
BACKWARD = {"backward_rtol": 1e-12, "backward_max_steps": 500}


def make_layer(kind: str, solver: str, backward_method: str = "anderson") -> nn.Module:
    f = TanhCell(3, 2)
    opts = {**SOLVERS[solver], **BACKWARD, "backward_method": backward_method, "state_shape": 3}
    if kind == "DEQ":
        return contdeq.DEQ(f, **opts)
    if kind == "SkipDEQ":
        return contdeq.SkipDEQ(f, nn.Linear(2, 3, dtype=torch.float64), **opts)
    return contdeq.SkipRegDEQ(f, **opts)


def gradcheck_layer(layer: nn.Module) -> None:
    """gradcheck of z* w.r.t. x and every parameter of f (finite differences)."""
    names = [n for n, _ in layer.named_parameters() if n.startswith("f.")]
    params = [p.detach().clone().requires_grad_() for n, p in layer.named_parameters()
              if n.startswith("f.")]
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("kind", ["DEQ", "SkipDEQ", "SkipRegDEQ"])
def test_gradcheck_layers(kind: str, solver: str) -> None:
    gradcheck_layer(make_layer(kind, solver))


@pytest.mark.parametrize("method", [m for m in BACKWARD_METHODS if m != "anderson"])
def test_gradcheck_backward_methods(method: str) -> None:
    layer = make_layer("DEQ", "anderson", backward_method=method)
    if method == "ode":  # an integrator cannot resolve 1e-12: its own tolerance is 10x tighter
        layer.backward_mode = dataclasses.replace(layer.backward_mode, rtol=1e-8)
    gradcheck_layer(layer)


def test_gradcheck_spectral_norm_cap() -> None:
    f = TanhCell(3, 2, lipschitz=2.0, cap=0.6)
    layer = contdeq.DEQ(f, solver="anderson", state_shape=3, max_steps=200, **TIGHT, **BACKWARD)
    layer.eval()  # fixed power-iteration vectors: f is one function of its parameters
    gradcheck_layer(layer)


def test_jfb_is_one_vjp() -> None:
    """backward='jfb' gives exactly w = dL/dz* pushed through one VJP of f at z*."""
    layer = contdeq.DEQ(TanhCell(4, 3), solver="anderson", backward="jfb", state_shape=4, **TIGHT)
    x = torch.randn(5, 3, dtype=torch.float64)
    z = layer(x)
    v = torch.randn_like(z)
    (z * v).sum().backward()
    ref = TanhCell(4, 3)
    ref.load_state_dict(layer.f.state_dict())
    (ref(z.detach(), x) * v).sum().backward()
    assert torch.allclose(layer.f.W.weight.grad, ref.W.weight.grad)
    assert layer.stats.backward is None


@pytest.mark.parametrize("solver", ["ode", "picard"])
def test_implicit_matches_unrolled(solver: str) -> None:
    """IFT gradients equal backprop through a long unrolled solve (float64)."""
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 5, dtype=torch.float64)
    grads = {}
    for mode in ("implicit", "unrolled"):
        torch.manual_seed(1)
        layer = contdeq.DEQ(TanhCell(5, 3, lipschitz=0.8), solver=solver, backward=mode,
                            state_shape=5, max_steps=3000, atol=1e-11, rtol=1e-11,
                            backward_rtol=1e-11, backward_max_steps=500)
        x.grad = None
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        assert layer.stats.forward.steps > 20  # a long solve
        grads[mode] = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    for gi, gu in zip(grads["implicit"], grads["unrolled"], strict=True):
        torch.testing.assert_close(gi, gu, rtol=1e-7, atol=1e-10)


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` runs."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        seen[key] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_memory_constant_in_solver_steps() -> None:
    """What the implicit layer keeps for backward, and its backward's saved tensors, do not
    grow with the number of forward steps; unrolled backprop grows linearly."""
    x = torch.randn(16, 8, dtype=torch.float64)
    results = {}
    for mode in ("implicit", "unrolled"):
        for max_step in (0.5, 0.05):
            torch.manual_seed(0)
            layer = contdeq.DEQ(TanhCell(32, 8), backward=mode, state_shape=32,
                                max_step=max_step, max_steps=5000)
            out = {}

            def forward(layer=layer, out=out) -> None:
                out["z"] = layer(x)

            fwd = saved_bytes(forward)
            bwd = saved_bytes(lambda out=out: out["z"].pow(2).sum().backward())
            results[mode, max_step] = (fwd, bwd, layer.stats.forward.steps)
    few, many = results["implicit", 0.5], results["implicit", 0.05]
    assert many[2] >= 5 * few[2]  # ten times smaller steps: many more of them
    assert many[0] == few[0]  # forward keeps only z*, x and references to the parameters
    assert many[1] == few[1]  # the backward's own graph is one f call
    ufew, umany = results["unrolled", 0.5], results["unrolled", 0.05]
    assert umany[0] > 4 * ufew[0] > 4 * few[0]


def test_backward_stats_and_scale_invariance() -> None:
    """A batch-mean loss scales dL/dz* by 1/B; the backward iteration count does not change."""
    layer = contdeq.DEQ(TanhCell(16, 4), solver="anderson", state_shape=16)
    x = torch.randn(64, 4, dtype=torch.float64)
    counts = []
    for scale in (1.0, 1e-6):
        layer.zero_grad()
        (scale * layer(x).pow(2).sum()).backward()
        stats = layer.stats.backward
        assert stats is not None and stats.all_converged and stats.nfe == stats.steps + 1
        counts.append(stats.nfe)
    assert counts[0] == counts[1]


@pytest.mark.parametrize("method", list(BACKWARD_METHODS))
def test_solve_adjoint_linear_system(method: str) -> None:
    """solve_adjoint solves (I - J)^T w = v for an explicit contraction J."""
    gen = torch.Generator().manual_seed(0)
    b, d = 4, 6
    j = torch.randn(b, d, d, generator=gen, dtype=torch.float64)
    j = 0.7 * j / torch.linalg.matrix_norm(j, ord=2).reshape(b, 1, 1)
    v = 1e-8 * torch.randn(b, d, generator=gen, dtype=torch.float64)
    w, stats = solve_adjoint(lambda w: torch.einsum("bij,bi->bj", j, w), v, method=method,
                             rtol=1e-10, max_steps=500)
    eye = torch.eye(d, dtype=torch.float64)
    exact = torch.linalg.solve((eye - j).transpose(1, 2), v.unsqueeze(2)).squeeze(2)
    error = contdeq.solvers.sample_rms(w - exact) / contdeq.solvers.sample_rms(exact)
    assert float(error.max()) < 1e-8  # tol 1e-10 / (1 - ||J||) with ||J|| = 0.7, and margin
    assert stats.all_converged


def test_backward_nonconvergence_follows_option() -> None:
    x = torch.randn(4, 3, dtype=torch.float64)
    for option, expectation in (("warn", pytest.warns(ConvergenceWarning, match="backward")),
                                ("raise", pytest.raises(ConvergenceError, match="backward"))):
        layer = contdeq.DEQ(TanhCell(8, 3, lipschitz=0.95), solver="anderson", state_shape=8,
                            backward_method="picard", backward_max_steps=2,
                            on_nonconvergence=option)
        z = layer(x)
        with expectation:
            z.sum().backward()
        assert layer.stats.backward is not None and not layer.stats.backward.all_converged
    layer = contdeq.DEQ(TanhCell(8, 3, lipschitz=0.95), solver="anderson", state_shape=8,
                        backward_method="picard", backward_max_steps=2, on_nonconvergence="ignore")
    layer(x).sum().backward()


def test_unrolled_rejects_in_place_solvers() -> None:
    with pytest.raises(ValueError, match="unrolled"):
        contdeq.DEQ(TanhCell(3, 2), solver="anderson", backward="unrolled")


def test_equilibrium_functional_without_grad_builds_nothing() -> None:
    f = TanhCell(4, 2)
    x = torch.randn(3, 2, dtype=torch.float64)
    with torch.no_grad():
        z, stats = contdeq.equilibrium(f, x, torch.zeros(3, 4, dtype=torch.float64),
                                       solver=contdeq.ForwardSolver("picard"))
    assert z.grad_fn is None and stats.backward is None and stats.forward.all_converged
