"""Mixed precision: torch.autocast (bf16 on CPU) through the layers' forward and implicit
backward, half-precision models, and tolerance defaults that follow the dtype."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import contdeq
from contdeq.solvers import default_tolerance, fixed_point, sample_rms, steady_state
from contdeq.solvers.validation import function_precision

BF16_TOL = 2 * 2.0**-7
FP16_TOL = 2 * 2.0**-10


class Cell(nn.Module):
    """``f(z, x) = tanh(W z + U x)`` with ``W`` capped at spectral norm 0.8."""

    def __init__(self, d: int = 16, cap: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        if cap:
            contdeq.spectral_norm_cap(self.lin, cap=0.8)
        else:
            with torch.no_grad():
                self.lin.weight.mul_(0.8 / torch.linalg.matrix_norm(self.lin.weight, 2))
        self.inp = nn.Linear(d, d)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(z) + self.inp(x))


def test_default_tolerance_follows_the_dtype_and_autocast() -> None:
    """``max(1e-4, 2 eps)``: 1e-4 for float32/64, ``2 eps`` for fp16/bf16, and the autocast
    or declared function dtype when coarser than the state's. Catches a bf16 default of 1e-4
    (unreachable: a bf16 solve never converges) and a float32 default changed by the policy."""
    assert default_tolerance(torch.float64) == 1e-4
    assert default_tolerance(torch.float32) == 1e-4
    assert default_tolerance(torch.float16) == FP16_TOL
    assert default_tolerance(torch.bfloat16) == BF16_TOL
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert default_tolerance(torch.float32, "cpu") == BF16_TOL
    with function_precision(torch.float16):
        assert default_tolerance(torch.float32) == FP16_TOL
    assert default_tolerance(torch.float32) == 1e-4  # the context was left


@pytest.mark.parametrize("solve", ["steady_state", "fixed_point"])
def test_half_precision_states_converge_with_default_tolerances(solve: str) -> None:
    """A bf16 state converges with the defaults, its test run at the bf16 default. Catches the
    old fixed 1e-4 (no convergence within max_steps)."""
    torch.manual_seed(0)
    a = torch.randn(16, 16) * 0.5 / 4
    x = torch.randn(8, 16)
    a, x = a.bfloat16(), x.bfloat16()
    z0 = torch.zeros(8, 16, dtype=torch.bfloat16)
    if solve == "steady_state":
        z, stats = steady_state(lambda t, z: torch.tanh(z @ a + x) - z, z0,
                                on_nonconvergence="raise")
    else:
        z, stats = fixed_point(lambda z: torch.tanh(z @ a + x), z0, on_nonconvergence="raise")
    assert z.dtype == torch.bfloat16
    expected = BF16_TOL + BF16_TOL * sample_rms(z).float()
    torch.testing.assert_close(stats.tolerance.float(), expected, rtol=1e-2, atol=0)


def test_explicit_tolerances_are_kept_for_half_precision() -> None:
    """Given tolerances are not replaced by the dtype default (only ``None`` is)."""
    z0 = torch.ones(2, 3, dtype=torch.bfloat16)
    _, stats = fixed_point(lambda z: 0.5 * z, z0, atol=0.5, rtol=0.0)
    torch.testing.assert_close(stats.tolerance.float(), torch.full((2,), 0.5))


def test_spectral_norm_cap_under_autocast_keeps_float32_power_iteration() -> None:
    """Under autocast the cap's ``sigma`` is the float32 one and the power-iteration buffers
    stay float32 after an update. Catches ``dot: expected both vectors to have same dtype``
    and buffers silently turned bf16."""
    lin = contdeq.spectral_norm_cap(nn.Linear(8, 8), cap=0.5)
    cap = lin.parametrizations.weight[0]
    weight = lin.parametrizations.weight.original
    expected = cap.sigma(weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cap.sigma(weight)
        contdeq.update_normalization(lin)
        lin(torch.randn(2, 8))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    assert cap.u.dtype == torch.float32 and cap.v.dtype == torch.float32


@pytest.mark.parametrize("solver", ["ode", "anderson"])
@pytest.mark.parametrize("cap", [True, False])
def test_autocast_bf16_forward_and_implicit_backward(solver: str, cap: bool) -> None:
    """A DEQ trained step under ``torch.autocast("cpu", bfloat16)`` converges forward and
    backward with default tolerances, keeps a float32 state, and its gradients agree with the
    float32 ones to bf16 accuracy. Catches the issue's failures (the cap's dot, ``mat1 and
    mat2 must have the same dtype`` in the backward, Anderson's bf16 Gram solve) and a
    backward that drops autocast or computes garbage."""
    torch.manual_seed(0)
    model = contdeq.DEQ(Cell(cap=cap), solver=solver, on_nonconvergence="raise")
    x = torch.randn(8, 16)

    def grads(autocast: bool) -> tuple[Tensor, list[Tensor]]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z = model(x)
            loss = z.float().pow(2).mean()
        loss.backward()
        return z, [p.grad.clone() for p in model.parameters()]

    z16, g16 = grads(True)
    assert z16.dtype == torch.float32
    assert model.stats.backward is not None and bool(model.stats.backward.converged.all())
    z32, g32 = grads(False)
    # bf16 default tolerance 1.6e-2 and contraction 0.8: |z16 - z*| up to ~8% of |z*|
    assert (z16 - z32).norm() <= 0.1 * z32.norm()
    for a, b in zip(g16, g32, strict=True):
        assert a.dtype == torch.float32
        assert (a - b).norm() <= 0.2 * b.norm()


class TwoScales(nn.Module):
    """:class:`Cell` on two scales of 8 features each (``f(zs, x)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = Cell()

    def forward(self, zs: tuple[Tensor, ...], x: Tensor) -> tuple[Tensor, ...]:
        return self.cell(torch.cat(zs, dim=1), x).split(8, dim=1)


class TwoScalePredictor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.lin(x).split(8, dim=1)


@pytest.mark.parametrize("multiscale", [False, True])
def test_autocast_predicted_start(multiscale: bool) -> None:
    """A Skip DEQ's predictor computes in the autocast dtype like ``f``: its prediction is
    the float32 state's start and its skip term trains it. Catches the prediction refused
    for not having ``x``'s dtype (float32) under autocast."""
    torch.manual_seed(0)
    if multiscale:
        model: nn.Module = contdeq.MultiScaleSkipDEQ(TwoScales(), TwoScalePredictor(),
                                                     state_shapes=[(8,), (8,)])
    else:
        model = contdeq.SkipDEQ(Cell(), nn.Linear(16, 16))
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(x)
    z16 = torch.cat(z, dim=1) if multiscale else z
    assert z16.dtype == torch.float32
    loss = z16.pow(2).mean() + contdeq.aux_loss(model)
    loss.backward()
    predictor = model.predictor.lin if multiscale else model.predictor
    assert predictor.weight.grad is not None and float(predictor.weight.grad.abs().max()) > 0
    with torch.no_grad():
        z32 = model(x)
    z32 = torch.cat(z32, dim=1) if multiscale else z32
    assert (z16 - z32).norm() <= 0.1 * z32.norm()


LAYERS_CALLING_F_BEFORE_THE_SOLVE = {
    "SkipRegDEQ": lambda: contdeq.SkipRegDEQ(Cell()),
    "MultiScaleSkipRegDEQ": lambda: contdeq.MultiScaleSkipRegDEQ(TwoScales(),
                                                                 state_shapes=[(8,), (8,)]),
    "DEQ with Noise": lambda: contdeq.DEQ(Cell(), modifiers=(contdeq.nn.Noise(0.1),)),
    "NeuralODE": lambda: contdeq.NeuralODE(Cell()),
    "NeuralODE adjoint": lambda: contdeq.NeuralODE(Cell(), adjoint=True),
    "NeuralSDE": lambda: contdeq.NeuralSDE(Cell(), Cell()),
    "WeightTied": lambda: contdeq.WeightTied(Cell(), 4),
}


@pytest.mark.parametrize("layer", LAYERS_CALLING_F_BEFORE_THE_SOLVE)
def test_autocast_first_call_of_f(layer: str) -> None:
    """Layers that call ``f`` themselves (``f(0, x)`` of Skip-Reg, the noisy start, the
    baselines' first step) accept its output in the autocast dtype as ``f``'s solves do, and
    train. Catches "f(z, x) must return dtype torch.float32 like the state z, got
    torch.bfloat16" raised by the first call's check."""
    torch.manual_seed(0)
    model = LAYERS_CALLING_F_BEFORE_THE_SOLVE[layer]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(torch.randn(8, 16))
        z = torch.cat(z, dim=1) if isinstance(z, tuple) else z
        loss = z.float().pow(2).mean()
    (loss + contdeq.aux_loss(model)).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_autocast_input_state_is_solved_in_float32() -> None:
    """An input computed under autocast (a bf16 encoder output) gives a float32 equilibrium
    (a bf16 state stagnates where ``f(z)`` rounds to ``z``), close to the float32 one and
    converged at the bf16 default tolerance. Catches a solve left in bf16 and a tolerance
    that ignores autocast (no convergence)."""
    torch.manual_seed(0)
    model = contdeq.DEQ(Cell(), on_nonconvergence="raise").eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = model(x.bfloat16())
    assert z.dtype == torch.float32
    assert (z - reference).norm() <= 0.1 * reference.norm()


@pytest.mark.parametrize("solver", ["ode", "anderson"])
def test_bf16_model_converges_with_defaults(solver: str) -> None:
    """A model converted with ``.to(torch.bfloat16)`` converges forward and backward with the
    default tolerances (before: 1000 steps without convergence)."""
    torch.manual_seed(0)
    model = contdeq.DEQ(Cell(), solver=solver, on_nonconvergence="raise").to(torch.bfloat16)
    z = model(torch.randn(8, 16, dtype=torch.bfloat16))
    z.float().pow(2).sum().backward()
    assert z.dtype == torch.bfloat16
    assert bool(model.stats.forward.converged.all())
    assert bool(model.stats.backward.converged.all())
    assert model.f.inp.weight.grad is not None and model.f.inp.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_forward_and_implicit_backward(dtype: torch.dtype) -> None:
    """On CUDA, fp16 and bf16 autocast run the forward and the implicit backward with default
    tolerances, and the gradients agree with the float32 CUDA ones to half precision."""
    torch.manual_seed(0)
    model = contdeq.DEQ(Cell(), solver="anderson", on_nonconvergence="raise").cuda()
    x = torch.randn(8, 16, device="cuda")

    def grads(autocast: bool) -> list[Tensor]:
        model.zero_grad()
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(True), grads(False), strict=True):
        assert (a - b).norm() <= 0.2 * b.norm()
