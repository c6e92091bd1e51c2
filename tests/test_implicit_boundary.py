"""The implicit-gradient boundary without side effects: one wrapper around each call of ``f``,
a layer's input carried by the solve (``Restart(x=...)`` rebinds the solve's wrapper and the
result reports the final input), and the forward's stats returned by the autograd function."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import contdeq
from contdeq.implicit import ImplicitFunction
from contdeq.implicit.diagnostics import LayerInput
from contdeq.solvers import BoundInput, Restart, SolverStats, StepInfo, solve, steady_state

from .layer_models import TanhCell

TOL = 1e-8
#: Forward solvers and the options that choose their loop.
LOOPS = {"dopri5": {"solver": "ode"}, "ptc": {"solver": "ode", "method": "ptc"},
         "anderson": {"solver": "anderson"}, "broyden": {"solver": "broyden"},
         "picard": {"solver": "picard"}}
PACKAGE = Path(contdeq.__file__).resolve().parent
MODULE_PY = Path(nn.Module.__call__.__code__.co_filename).resolve()


def _wrappers() -> list[str]:
    """The call objects (``__call__`` frames of the package) between the caller of
    ``f.forward`` and the first frame that is not one: the wrappers this call passed."""
    frames = inspect.stack()[2:]  # above this helper and f.forward
    while frames and Path(frames[0].filename).resolve() == MODULE_PY:
        frames = frames[1:]  # nn.Module.__call__ itself
    found = []
    for frame in frames:
        path = Path(frame.filename).resolve()
        if frame.function != "__call__" or PACKAGE not in path.parents:
            break
        found.append(str(path.relative_to(PACKAGE)))
    return found


class RecordingCell(TanhCell):
    """:class:`TanhCell` that records the wrappers of each of its calls."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.calls: list[list[str]] = []

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        self.calls.append(_wrappers())
        return super().forward(z, x)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "implicit"])
@pytest.mark.parametrize("loop", list(LOOPS))
def test_each_f_call_passes_one_wrapper(loop: str, grad: bool) -> None:
    """Every evaluation of ``f`` in a layer's forward solve after the first (which runs the
    checks) is called by the solve's one counted wrapper, with no other call object between:
    catches a residual, check or autocast wrapper put back on the call path."""
    torch.manual_seed(0)
    cell = RecordingCell(4, 3)
    layer = contdeq.DEQ(cell, state_shape=4, atol=TOL, rtol=TOL, **LOOPS[loop])
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        layer(x)
    assert len(cell.calls) == layer.stats.forward.nfe > 3
    assert all(w == ["solvers/counting.py"] for w in cell.calls[1:]), cell.calls


def test_under_autocast_f_still_passes_one_wrapper() -> None:
    """Autocast is applied by the counted wrapper itself (no closure around ``f``); ``f``
    computes in bf16 and the state stays float32."""
    torch.manual_seed(0)
    cell = RecordingCell(4, 3, dtype=torch.float32)
    layer = contdeq.DEQ(cell, state_shape=4, solver="picard")
    seen: list[torch.dtype] = []
    cell.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(torch.randn(5, 3))
    assert z.dtype == torch.float32 and set(seen) == {torch.bfloat16}
    assert all(w == ["solvers/counting.py"] for w in cell.calls[1:]), cell.calls


def _field(batch: int = 4, width: int = 3, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    cell = TanhCell(width, width)
    x = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    x2 = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    return cell, x, x2


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("solver", ["ode", "anderson", "picard"])
def test_restart_x_rebinds_the_solve_and_reports_the_final_input(solver: str, per_sample: bool
                                                                  ) -> None:
    """``Restart(x=x2)`` from a step callback: the solve ends at the equilibrium for ``x2``,
    ``stats.final_input`` is ``x2`` and the function given to the solve still holds ``x``
    (nothing the caller reads was changed). Without a restart ``final_input`` is ``None``.
    Also for a batch solved as one sample (``per_sample=False``)."""
    cell, x, x2 = _field()
    z0 = torch.zeros_like(x)
    fx = BoundInput(cell, x)
    with torch.no_grad():
        z2, _ = solve(solver, BoundInput(cell, x2), z0, atol=TOL, rtol=TOL,
                      per_sample=per_sample)
        plain = solve(solver, fx, z0, atol=TOL, rtol=TOL, per_sample=per_sample)
        shown: list[Tensor | None] = []

        def swap(info: StepInfo) -> Restart | None:
            shown.append(info.x)
            return Restart(x=x2) if info.step == 1 else None

        z, stats = solve(solver, fx, z0, atol=TOL, rtol=TOL, callback=swap,
                         per_sample=per_sample)
    assert plain.stats.final_input is None
    assert shown[0] is x and torch.equal(shown[-1], x2)
    assert fx.x is x
    assert stats.final_input is not None and torch.equal(stats.final_input, x2)
    torch.testing.assert_close(z, z2, rtol=0, atol=1e-6)
    assert (z - plain.z).abs().max() > 1e-2  # the restart mattered


def test_restart_x_without_an_input_is_refused() -> None:
    """A solve of a plain function has no input: ``StepInfo.x`` is ``None`` and
    ``Restart(x=...)`` raises, naming the layer's input."""
    cell, x, _ = _field()
    shown: list[Tensor | None] = []

    def swap(info: StepInfo) -> Restart:
        shown.append(info.x)
        return Restart(x=x)

    with pytest.raises(ValueError, match="layer's input"):
        steady_state(lambda t, z: cell(z, x) - z, torch.zeros_like(x), callback=swap)
    assert shown == [None]


def test_layer_stats_report_the_final_input_and_the_gradient_uses_it() -> None:
    """Through a layer (the implicit autograd function), the forward's stats carry the final
    input, and the backward linearizes ``f`` there: the gradient equals that of a layer
    solved for the final input directly, with the loss weights."""
    cell, x, x2 = _field()
    x = x.requires_grad_()
    layer = contdeq.DEQ(cell, atol=1e-10, rtol=1e-10,
                        callback=lambda info: Restart(x=x2) if info.step == 1 else None,
                        backward=contdeq.Implicit(rtol=1e-10))
    z = layer(x)
    final = layer.stats.forward.final_input
    assert final is not None and torch.equal(final, x2)
    (grad,) = torch.autograd.grad(z.sum(), x)
    direct_x = x2.clone().requires_grad_()
    direct = contdeq.DEQ(cell, atol=1e-10, rtol=1e-10, backward=contdeq.Implicit(rtol=1e-10))
    (expected,) = torch.autograd.grad(direct(direct_x).sum(), direct_x)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)


def test_implicit_function_returns_its_stats() -> None:
    """``ImplicitFunction`` returns ``(z*, stats)``: the stats leave the autograd function as
    an output (not through its arguments), also under ``torch.func.vmap``, where the mapped
    dimension is folded into one solve of ``N * B`` samples."""
    cell, x, _ = _field()
    solver = contdeq.ForwardSolver("anderson", atol=TOL, rtol=TOL)
    z, stats = contdeq.equilibrium(cell, x.requires_grad_(), torch.zeros_like(x), solver=solver)
    assert isinstance(stats.forward, SolverStats) and stats.forward.all_converged
    assert z.requires_grad and stats.forward.residual.shape == (4,)
    xs = torch.randn(2, 4, 3, dtype=torch.float64)

    def solved(x: Tensor) -> tuple[Tensor, Tensor]:
        z, s = contdeq.equilibrium(cell, x, torch.zeros_like(x), solver=solver)
        return z, s.forward.residual

    zs, residual = torch.func.vmap(solved, out_dims=(0, None))(xs)
    assert zs.shape == (2, 4, 3) and residual.shape == (8,)
    assert ImplicitFunction.forward.__annotations__["return"] == "tuple[Tensor, SolverStats]"


def test_layer_input_is_a_bound_input_with_the_layer_hints() -> None:
    """The layer's ``f(., x)`` keeps its hints: a badly shaped output names ``state_shape``
    (checked by the one wrapper, on the first call and on later ones)."""
    calls = [0]

    class Shrinks(nn.Module):
        def forward(self, z: Tensor, x: Tensor) -> Tensor:
            calls[0] += 1
            out = torch.tanh(0.5 * z + x)
            return out if calls[0] < 3 else out[:, :2]

    x = torch.randn(4, 3, dtype=torch.float64)
    assert isinstance(LayerInput(Shrinks(), x), BoundInput)
    with pytest.raises(ValueError, match="state_shape"):
        solve("picard", LayerInput(Shrinks(), x), torch.zeros_like(x))
    assert calls[0] == 3
