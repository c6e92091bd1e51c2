"""Explicit contracts: StopReason, the registries, the fixed-point solver protocol and the backward
mode objects, each checked against an independent reference (dense linear algebra), and a toy
method of each kind registered here to show that one class plus one registration is enough."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import Tensor

import contdeq
from contdeq import JFB, BackwardMode, Implicit, Unrolled
from contdeq.implicit import BACKWARD_METHODS, BACKWARD_MODES, FORWARD_SOLVERS
from contdeq.solvers import (
    FIXED_POINT_METHODS,
    STEADY_STATE_METHODS,
    ConvergenceError,
    StopReason,
    fixed_point,
    registries,
    steady_state,
)

from .layer_models import TanhCell

ROOT = Path(__file__).resolve().parent.parent
TIGHT = {"atol": 1e-12, "rtol": 1e-12, "max_steps": 300}


# -- StopReason ---------------------------------------------------------------------------
def test_stop_reason_values_are_the_old_strings() -> None:
    """The enum keeps every string callers compare with (a renamed value breaks them)."""
    assert {r.value for r in StopReason} == {"converged", "max_steps", "t_max", "timeout",
                                             "event", "t_end", "depth", "callback", "stalled"}
    for reason in StopReason:
        assert reason == reason.value and str(reason) == reason.value
        assert f"{reason:>10s}" == f"{reason.value:>10s}"


def test_solver_stats_carry_a_stop_reason() -> None:
    """Solves report a StopReason that still equals the old string, in the stats and in the
    summary line (catches a loop or Progress.finish passing a bare or wrong value)."""
    z0 = torch.zeros(3, 2, dtype=torch.float64)
    _, done = steady_state(lambda t, z: torch.tanh(0.5 * z + 1) - z, z0)
    _, capped = fixed_point(lambda z: torch.tanh(0.5 * z + 1), z0, method="picard",
                            max_steps=1, on_nonconvergence="ignore")
    assert done.stop_reason is StopReason.CONVERGED and done.stop_reason == "converged"
    assert capped.stop_reason is StopReason.MAX_STEPS and "stop=max_steps," in capped.summary()
    with pytest.raises(ValueError, match="not a valid StopReason"):
        dataclasses.replace(done, stop_reason="finished")


# -- registries ---------------------------------------------------------------------------
def test_registry_validates_and_refuses_duplicates() -> None:
    """Validation reads the registry (the message names the argument and lists the names);
    a name cannot be registered twice, nor shadow one of an included registry."""
    with pytest.raises(ValueError, match=r"method must be one of \('anderson', 'broyden', "
                                         r"'newton', 'picard'\), got 'newtonian'"):
        FIXED_POINT_METHODS.check("newtonian")
    with pytest.raises(ValueError, match="already registered"):
        FIXED_POINT_METHODS.register("picard", object)
    with pytest.raises(ValueError, match="already registered"):
        FORWARD_SOLVERS.register("anderson", object)  # included from FIXED_POINT_METHODS
    assert tuple(STEADY_STATE_METHODS) == ("dopri5", "tsit5", "bosh3", "dopri8",
                                           "adaptive_heun", "implicit_ptc", "ptc")


def test_documentation_names_every_registered_method() -> None:
    """docs/solvers.md mentions each registered name as ``"name"`` (a method registered
    without documentation fails here)."""
    text = (ROOT / "docs" / "solvers.md").read_text()
    missing = {(registry.kind, name) for registry in registries() for name in registry
               if f'"{name}"' not in text}
    assert not missing, f"docs/solvers.md does not mention {sorted(missing)}"


# -- a new fixed-point solver: one class, one registration -----------------------------------
class Aitken:
    """Componentwise Aitken delta-squared extrapolation; evaluates ``g`` once more per step
    (so it needs the map: ``needs_map = True``). Exact in one step for a diagonal affine map."""

    needs_map: ClassVar[bool] = True

    def __init__(self, like: Tensor, *, g, floor: float = 1e-30) -> None:
        self.g = g
        self.floor = floor

    def propose(self, z: Tensor, gz: Tensor, residual: Tensor) -> Tensor:
        ggz = self.g(gz)
        curvature = ggz - 2 * gz + z
        safe = curvature.abs() > self.floor
        return torch.where(safe, z - residual**2 / torch.where(safe, curvature, 1.0), gz)


@pytest.fixture
def aitken() -> Iterator[str]:
    FIXED_POINT_METHODS.register("aitken", Aitken)
    try:
        yield "aitken"
    finally:
        FIXED_POINT_METHODS.unregister("aitken")


def test_new_fixed_point_solver_is_one_registration(aitken: str) -> None:
    """A registered solver with needs_map=True is given the counted map (its calls count in
    nfe), and the layers accept it as forward solver and backward method."""
    scale = torch.tensor([[0.5, -0.3, 0.9]], dtype=torch.float64)
    shift = torch.tensor([[1.0, 2.0, -1.0]], dtype=torch.float64)
    z, stats = fixed_point(lambda z: scale * z + shift, torch.zeros(2, 3, dtype=torch.float64),
                           method=aitken, atol=1e-12, rtol=0.0)
    torch.testing.assert_close(z, (shift / (1 - scale)).expand(2, 3))
    assert stats.steps == 1 and stats.nfe == 1 + 2 * stats.steps  # g(z0), then g(z), g(g(z))
    assert aitken in FORWARD_SOLVERS and aitken in BACKWARD_METHODS  # included, live
    layer = contdeq.DEQ(TanhCell(4, 3), solver=aitken, state_shape=4, **TIGHT)
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        z = layer(x)
    assert layer.stats.forward.all_converged
    torch.testing.assert_close(layer.f(z, x), z, atol=1e-10, rtol=0)


# -- backward modes against a dense implicit-function-theorem gradient -----------------------
def dense_gradients(f: TanhCell, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(dL/dx, dL/dW)`` for ``L = sum(v * z*)``: ``w_b = (I - J_b)^-T v_b`` with the dense
    per-sample Jacobian ``J_b = df/dz`` at a tightly solved ``z*``, then one VJP of ``f``."""
    with torch.no_grad():
        z, _ = fixed_point(lambda z: f(z, x), torch.zeros_like(v), atol=1e-14, rtol=0.0,
                           max_steps=500)
    eye = torch.eye(z.shape[1], dtype=z.dtype)
    jac = torch.stack([torch.autograd.functional.jacobian(
        lambda zb, b=b: f(zb.unsqueeze(0), x[b:b + 1]).squeeze(0), z[b]) for b in range(len(z))])
    w = torch.linalg.solve((eye - jac).transpose(1, 2), v.unsqueeze(2)).squeeze(2)
    xr = x.detach().requires_grad_()
    gx, gw = torch.autograd.grad(f(z, xr), (xr, f.W.weight), w)
    return gx, gw


def layer_gradients(layer: contdeq.DEQ, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    xr = x.detach().requires_grad_()
    gx, gw = torch.autograd.grad((layer(xr) * v).sum(), (xr, layer.f.W.weight))
    return gx, gw


@pytest.mark.parametrize(("backward", "shorthand"), [
    (Implicit(rtol=1e-12, max_steps=500), {"backward_rtol": 1e-12, "backward_max_steps": 500}),
    (Implicit("broyden", rtol=1e-12, max_steps=500),
     {"backward_method": "broyden", "backward_rtol": 1e-12, "backward_max_steps": 500}),
    (Unrolled(), {"backward": "unrolled"}),
], ids=["implicit-anderson", "implicit-broyden", "unrolled"])
def test_backward_objects_match_dense_gradient_and_shorthand(backward: BackwardMode,
                                                             shorthand: dict) -> None:
    """A mode object gives the dense implicit-function-theorem gradient, as its string/keyword
    shorthand does (catches a mode object whose fields are ignored or mis-mapped)."""
    torch.manual_seed(0)
    f = TanhCell(4, 3)
    x = torch.randn(5, 3, dtype=torch.float64)
    v = torch.randn(5, 4, dtype=torch.float64)
    want = dense_gradients(f, x, v)
    for layer in (contdeq.DEQ(f, solver="picard", backward=backward, state_shape=4, **TIGHT),
                  contdeq.DEQ(f, solver="picard", state_shape=4, **shorthand, **TIGHT)):
        for got, ref in zip(layer_gradients(layer, x, v), want, strict=True):
            torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-9)


def test_jfb_object_is_one_vjp_and_differs_from_implicit() -> None:
    """JFB() takes w = v: the gradient is one VJP of f at z* (not the dense gradient)."""
    torch.manual_seed(1)
    f = TanhCell(4, 3)
    x = torch.randn(5, 3, dtype=torch.float64)
    v = torch.randn(5, 4, dtype=torch.float64)
    layer = contdeq.DEQ(f, solver="anderson", backward=JFB(), state_shape=4, **TIGHT)
    gx, gw = layer_gradients(layer, x, v)
    z = layer(x).detach()
    xr = x.detach().requires_grad_()
    ref = torch.autograd.grad(f(z, xr), (xr, f.W.weight), v)
    torch.testing.assert_close(gx, ref[0])
    torch.testing.assert_close(gw, ref[1])
    assert not torch.allclose(gw, dense_gradients(f, x, v)[1], atol=1e-6)


def test_object_and_keywords_together_are_refused() -> None:
    """Passing both a mode object and backward_* keywords is ambiguous: TypeError naming them."""
    with pytest.raises(TypeError, match="backward_rtol"):
        contdeq.DEQ(TanhCell(3, 2), backward=Implicit(), backward_rtol=1e-6)
    with pytest.raises(ValueError, match=re.escape(
            f"backward must be one of {tuple(BACKWARD_MODES)}, got 'adjoint'")):
        contdeq.DEQ(TanhCell(3, 2), backward="adjoint")
    with pytest.raises(ValueError, match="rtol must be finite and > 0"):
        Implicit(rtol=-1.0)
    with pytest.raises(ValueError, match="unrolled"):
        contdeq.DEQ(TanhCell(3, 2), solver="anderson", backward=Unrolled())


def test_layer_on_nonconvergence_reaches_an_implicit_object() -> None:
    """Implicit(on_nonconvergence=None) takes the layer's policy ("raise" here), so a capped
    backward solve raises instead of warning."""
    layer = contdeq.DEQ(TanhCell(4, 3, lipschitz=0.9), solver="anderson", state_shape=4,
                        backward=Implicit("picard", max_steps=1, rtol=1e-12),
                        on_nonconvergence="raise", **TIGHT)
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ConvergenceError, match="backward linear solve"):
        layer(x).sum().backward()


def test_multiscale_layer_takes_a_backward_object() -> None:
    """A multi-scale layer forwards backward=Implicit(...) to the DEQ machinery: its gradient
    equals that of the keyword form exactly (same solve)."""
    torch.manual_seed(2)
    shapes = ((2,), (3,))

    class Cell(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(5, 5, dtype=torch.float64)
            with torch.no_grad():
                self.a.weight.mul_(0.4 / torch.linalg.matrix_norm(self.a.weight, ord=2))

        def forward(self, zs: tuple[Tensor, ...], x: Tensor) -> tuple[Tensor, ...]:
            out = torch.tanh(self.a(torch.cat(zs, 1)) + x)
            return out[:, :2], out[:, 2:]

    cell = Cell()
    x = torch.randn(4, 5, dtype=torch.float64)
    grads = []
    for options in ({"backward": Implicit("picard", rtol=1e-10, max_steps=300)},
                    {"backward_method": "picard", "backward_rtol": 1e-10,
                     "backward_max_steps": 300}):
        layer = contdeq.MultiScaleDEQ(cell, state_shapes=shapes, solver="anderson", **options,
                                      **TIGHT)
        assert layer.backward_mode == Implicit("picard", rtol=1e-10, max_steps=300,
                                               on_nonconvergence="warn")
        cell.zero_grad()
        sum(z.square().sum() for z in layer(x)).backward()
        grads.append(cell.a.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)
    assert layer.stats.backward.all_converged


# -- a new backward mode: one class, one registration ---------------------------------------
@dataclasses.dataclass(frozen=True)
class Neumann(BackwardMode):
    """Truncated Neumann series ``w = sum_{i <= terms} (J^T)^i v`` (a toy mode)."""

    terms: int = 80

    def gradient_weights(self, vjp, v: Tensor, record) -> Tensor:
        w, term = v.clone(), v
        for _ in range(self.terms):
            term = vjp(term)
            w = w + term
        return w


@pytest.fixture
def neumann() -> Iterator[str]:
    BACKWARD_MODES.register("neumann", Neumann)
    try:
        yield "neumann"
    finally:
        BACKWARD_MODES.unregister("neumann")


def test_new_backward_mode_is_one_registration(neumann: str) -> None:
    """A registered mode works as an object and by name, and its many-term series reaches the
    dense implicit gradient (its one-term truncation does not)."""
    torch.manual_seed(3)
    f = TanhCell(4, 3)
    x = torch.randn(5, 3, dtype=torch.float64)
    v = torch.randn(5, 4, dtype=torch.float64)
    want = dense_gradients(f, x, v)
    by_name = contdeq.DEQ(f, solver="anderson", backward=neumann, state_shape=4, **TIGHT)
    assert by_name.backward_mode == Neumann()
    for got, ref in zip(layer_gradients(by_name, x, v), want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-9)
    short = contdeq.DEQ(f, solver="anderson", backward=Neumann(terms=1), state_shape=4, **TIGHT)
    assert not torch.allclose(layer_gradients(short, x, v)[1], want[1], atol=1e-4)
    assert re.search(r"backward=Neumann\(terms=80\)", repr(by_name))


def test_backward_mode_maps_the_keyword_form() -> None:
    """The exported backward_mode keeps the layers' keyword form and returns the mode objects."""
    assert contdeq.backward_mode(method="broyden", rtol=1e-6) == Implicit("broyden", rtol=1e-6)
    assert contdeq.backward_mode("jfb") == JFB()
    assert isinstance(contdeq.backward_mode("unrolled"), Unrolled)


def test_the_warm_implicit_name_takes_the_backward_keywords() -> None:
    """Catches ``backward="implicit_warm"`` silently dropping ``backward_rtol`` and the other
    ``backward_*`` keywords (its mode solves the same linear system as ``"implicit"``); names
    without a linear solve still ignore them, and bad values are named."""
    mode = contdeq.backward_mode("implicit_warm", method="picard", rtol=1e-7, max_steps=9,
                                 options={"damping": 0.5})
    assert isinstance(mode, contdeq.WarmImplicit)
    assert (mode.method, mode.rtol, mode.max_steps, dict(mode.options)) == (
        "picard", 1e-7, 9, {"damping": 0.5})
    class Cell(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(4, 4)

        def forward(self, z: Tensor, x: Tensor) -> Tensor:
            return torch.tanh(0.5 * self.a(z) + x)

    layer = contdeq.DEQ(Cell(), backward="implicit_warm", backward_rtol=1e-7)
    assert isinstance(layer.backward_mode, contdeq.WarmImplicit)
    assert layer.backward_mode.rtol == 1e-7
    assert contdeq.backward_mode("jfb", rtol=1e-7) == JFB()
    with pytest.raises(ValueError, match="backward_rtol"):
        contdeq.backward_mode("implicit_warm", rtol=-1.0)


def test_backward_config_is_the_deprecated_name_of_backward_mode() -> None:
    """``BackwardConfig`` (a function named like a class, with ``tol``) still works for one
    release: a DeprecationWarning at the caller's line names ``backward_mode`` and ``rtol``,
    and it returns what backward_mode returns, positionally too."""
    cases = [((), {"method": "broyden", "tol": 1e-6, "max_steps": 7}),
             (("implicit", "anderson", 1e-8, 9, {"memory": 3}, "raise"), {}), (("jfb",), {})]
    for args, keywords in cases:
        new_keywords = {("rtol" if k == "tol" else k): v for k, v in keywords.items()}
        with pytest.warns(DeprecationWarning,
                          match=r"BackwardConfig.*deprecated.*backward_mode\(\.\.\., rtol=") as rec:
            old = contdeq.BackwardConfig(*args, **keywords)
        assert rec[0].filename == __file__
        assert old == contdeq.backward_mode(*args, **new_keywords)
    assert old == JFB()
