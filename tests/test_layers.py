"""The nn.Module layers: training in nn.Sequential, skip predictors, aux_loss, inference mode,
bad input, dtypes, serialization."""

from __future__ import annotations

import copy
import io
import os
import pickle
import warnings

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import contdeq
from contdeq.solvers import FIXED_POINT_METHODS, ConvergenceWarning

from .layer_models import TanhCell


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """256 digits as ``(256, 64)`` float32 in [0, 1] and their labels."""
    data = load_digits()
    x = torch.tensor(data.data[:256], dtype=torch.float32) / 16.0
    y = torch.tensor(data.target[:256])
    return x, y


def make_classifier(layer_kind: str, width: int = 32, solver: str = "ode",
                    **options: object) -> nn.Sequential:
    """encoder -> equilibrium layer -> linear read-out, as a user would stack them."""
    torch.manual_seed(0)
    f = TanhCell(width, width, lipschitz=0.5, dtype=torch.float32, cap=0.9)
    layers = {
        "DEQ": lambda: contdeq.DEQ(f, solver=solver, **options),
        "SkipDEQ": lambda: contdeq.SkipDEQ(f, nn.Sequential(nn.Linear(width, width), nn.Tanh()),
                                           solver=solver, **options),
        "SkipRegDEQ": lambda: contdeq.SkipRegDEQ(f, solver=solver, **options),
        "NeuralODE": lambda: contdeq.NeuralODE(f),
    }
    return nn.Sequential(nn.Linear(64, width), layers[layer_kind](), nn.Linear(width, 10))


def train(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    """Adam on cross-entropy + aux_loss over fixed mini-batches; the task losses per step."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        idx = slice((step * 64) % 256, (step * 64) % 256 + 64)
        task = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        (task + contdeq.aux_loss(model)).backward()
        opt.step()
        losses.append(task.item())
    return losses


@pytest.mark.parametrize("kind", ["DEQ", "SkipDEQ", "SkipRegDEQ", "NeuralODE"])
def test_training_in_sequential_reduces_loss(kind: str, digits) -> None:
    x, y = digits
    model = make_classifier(kind)
    before = nn.functional.cross_entropy(model(x), y).item()
    train(model, x, y, steps=12)
    after = nn.functional.cross_entropy(model(x), y).item()
    assert after < 0.7 * before
    for p in model.parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())


@pytest.mark.parametrize("solver", list(FIXED_POINT_METHODS))
def test_discrete_solvers_train(solver: str, digits) -> None:
    x, y = digits
    model = make_classifier("DEQ", solver=solver)
    losses = train(model, x, y, steps=12)
    assert losses[-1] < 0.7 * losses[0]


def test_aux_loss_zero_for_plain_deq_positive_for_skip(digits) -> None:
    x, _ = digits
    plain = make_classifier("DEQ")
    plain(x[:16])
    aux = contdeq.aux_loss(plain)
    assert aux.shape == () and float(aux) == 0.0
    for kind in ("SkipDEQ", "SkipRegDEQ"):
        model = make_classifier(kind)
        model(x[:16])
        aux = contdeq.aux_loss(model)
        assert aux.item() > 0 and aux.requires_grad
        assert set(model[1].aux_terms) == {"skip"}


def test_skip_term_trains_only_the_guess(digits) -> None:
    """The skip term sees sg(z*): its gradient reaches the predictor and, through
    predictor(x), the encoder before the layer; not f through z*, nor the read-out."""
    x, _ = digits
    model = make_classifier("SkipDEQ")
    model(x[:16])
    contdeq.aux_loss(model).backward()
    encoder, layer, head = model
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0
               for p in layer.predictor.parameters())
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0
               for p in encoder.parameters())
    assert all(p.grad is None for p in (*layer.f.parameters(), *head.parameters()))


@pytest.mark.parametrize("kind", ["SkipDEQ", "SkipRegDEQ"])
def test_joint_skip_term_gradient_matches_unrolled(kind: str) -> None:
    """skip_detach=False (the paper's term): the skip term's gradient reaches f's parameters
    through z*, and equals backprop through a long unrolled solve (float64)."""
    grads = {}
    for backward in ("implicit", "unrolled"):
        torch.manual_seed(0)
        f = TanhCell(6, 4)
        extra = (nn.Linear(4, 6, dtype=torch.float64),) if kind == "SkipDEQ" else ()
        layer = getattr(contdeq, kind)(f, *extra, state_shape=6, skip_detach=False,
                                       skip_norm="l1", skip_weight=5.0, solver="picard",
                                       backward=backward, atol=1e-12, rtol=1e-12,
                                       max_steps=300, backward_rtol=1e-12,
                                       backward_max_steps=300)
        layer(torch.randn(5, 4, dtype=torch.float64))
        contdeq.aux_loss(layer).backward()
        grads[backward] = [p.grad.clone() for p in f.parameters()]
    for gi, gu in zip(grads["implicit"], grads["unrolled"], strict=True):
        assert float(gi.abs().max()) > 0
        torch.testing.assert_close(gi, gu, rtol=1e-6, atol=1e-9)


def test_skip_detach_must_be_bool() -> None:
    with pytest.raises(TypeError, match="skip_detach must be a bool"):
        contdeq.SkipRegDEQ(TanhCell(3, 3), skip_detach=1)


@pytest.mark.parametrize("kind", ["SkipDEQ", "SkipRegDEQ"])
def test_skip_guess_reduces_forward_nfe_after_training(kind: str, digits) -> None:
    """Training pulls the explicit guess toward z*, so the solve from it needs fewer f calls
    than the solve from zeros (same layer, same f), with dopri5, the paper's setting (ptc's
    solve from zeros already takes about 10 calls; docs/layers.md)."""
    x, y = digits
    model = make_classifier(kind, method="dopri5")
    train(model, x, y, steps=100)
    layer = model[1]
    model.eval()
    with torch.no_grad():
        h = model[0](x)
        guess = layer.initial_state(h, None)[0]
        z = layer(h)
        skip_nfe = layer.stats.forward.nfe
        layer(h, z0=torch.zeros_like(h))
        zero_nfe = layer.stats.forward.nfe
    relative_error = contdeq.solvers.sample_rms(guess - z) / contdeq.solvers.sample_rms(z)
    assert float(relative_error.mean()) < 0.15
    assert skip_nfe < 0.85 * zero_nfe


def test_skipreg_guess_is_f_of_zero() -> None:
    f = TanhCell(5, 3, dtype=torch.float32)
    layer = contdeq.SkipRegDEQ(f, state_shape=5)
    x = torch.randn(4, 3)
    guess, with_graph = layer.initial_state(x, None)
    torch.testing.assert_close(guess, f(torch.zeros(4, 5), x))
    assert with_graph is guess


def test_jacobian_regularizer_matches_exact_frobenius() -> None:
    torch.manual_seed(0)
    f = TanhCell(6, 4)
    z, x = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    jac = torch.func.vmap(torch.func.jacrev(lambda zi, xi: f(zi[None], xi[None])[0]))(z, x)
    exact = jac.detach().pow(2).sum() / z.numel()
    estimate = contdeq.jacobian_frobenius(f, z, x, probes=4000, create_graph=False)
    assert abs(float(estimate) / float(exact) - 1) < 0.06


def test_jacobian_term_is_added_and_differentiable() -> None:
    f = TanhCell(6, 4, dtype=torch.float32)
    layer = contdeq.DEQ(f, state_shape=6, jacobian_weight=0.5, jacobian_probes=2)
    layer(torch.randn(8, 4))
    term = layer.aux_terms["jacobian"]
    assert term.item() > 0
    term.backward()
    assert f.W.weight.grad is not None and float(f.W.weight.grad.abs().sum()) > 0


def test_inference_builds_no_graph_and_uses_eval_options() -> None:
    f = TanhCell(6, 4, dtype=torch.float32)
    layer = contdeq.DEQ(f, state_shape=6, atol=1e-6, rtol=1e-6, eval_options={"atol": 1e-2,
                                                                                "rtol": 1e-2})
    x = torch.randn(8, 4)
    train_nfe = (layer(x), layer.stats.forward.nfe)[1]
    layer.eval()
    z = layer(x)
    assert z.grad_fn is not None  # eval mode alone still trains through the layer
    assert layer.stats.forward.nfe < train_nfe
    assert float(layer.stats.forward.tolerance.max()) < 0.05
    with torch.no_grad():
        z = layer(x)
    assert z.grad_fn is None and not layer.aux_terms
    layer.train()
    with torch.no_grad():
        z = layer(x)
    assert z.grad_fn is None and not layer.aux_terms


def test_forward_and_backward_stats_recorded() -> None:
    layer = contdeq.DEQ(TanhCell(6, 4, dtype=torch.float32), state_shape=6)
    z = layer(torch.randn(8, 4))
    assert layer.stats.forward.all_converged and layer.stats.backward is None
    z.square().sum().backward()
    back = layer.stats.backward
    assert back is not None and back.all_converged and back.nfe >= 1
    assert "forward" in layer.stats.summary() and "backward" in layer.stats.summary()


def test_state_shape_inferred_from_x_or_given() -> None:
    layer = contdeq.DEQ(TanhCell(4, 4, dtype=torch.float32))
    assert layer(torch.randn(3, 4)).shape == (3, 4)
    layer = contdeq.DEQ(TanhCell(7, 4, dtype=torch.float32), state_shape=7)
    assert layer(torch.randn(3, 4)).shape == (3, 7)
    z0 = torch.full((3, 7), 0.1)
    assert layer(torch.randn(3, 4), z0=z0).shape == (3, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["DEQ", "SkipDEQ", "SkipRegDEQ", "NeuralODE"])
def test_dtypes(kind: str, dtype: torch.dtype) -> None:
    f = TanhCell(5, 3, dtype=dtype)
    layer = {
        "DEQ": lambda: contdeq.DEQ(f, state_shape=5),
        "SkipDEQ": lambda: contdeq.SkipDEQ(f, nn.Linear(3, 5, dtype=dtype)),
        "SkipRegDEQ": lambda: contdeq.SkipRegDEQ(f, state_shape=5),
        "NeuralODE": lambda: contdeq.NeuralODE(f, state_shape=5),
    }[kind]()
    x = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    z = layer(x)
    assert z.dtype == dtype and z.shape == (4, 5)
    z.sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype


class DropLast(nn.Module):
    """A wrong f: its output loses the state's last feature."""

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z[:, :-1]


def test_bad_input_errors() -> None:
    f = TanhCell(5, 3, dtype=torch.float32)
    layer = contdeq.DEQ(f, state_shape=5)
    with pytest.raises(TypeError, match=r"f must be an nn\.Module"):
        contdeq.DEQ(lambda z, x: z)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x contains NaN"):
        layer(torch.tensor([[1.0, float("nan"), 0.0]]))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"z0 must have shape \(B, \*state_shape\)"):
        layer(torch.randn(2, 3), z0=torch.zeros(2, 4))
    with pytest.raises(TypeError, match="z0 must have x's dtype"):
        layer(torch.randn(2, 3), z0=torch.zeros(2, 5, dtype=torch.float64))
    wrong = contdeq.DEQ(TanhCell(5, 3, dtype=torch.float32))  # state inferred as x's (B, 3)
    with pytest.raises(RuntimeError, match=r"state z of shape \(2, 3\).*set state_shape"):
        wrong(torch.randn(2, 3))
    wrong_out = contdeq.DEQ(DropLast(), state_shape=4)
    with pytest.raises(ValueError, match=r"shaped like the state z \(2, 4\), got \(2, 3\)"):
        wrong_out(torch.randn(2, 3))
    skip = contdeq.SkipDEQ(f, nn.Linear(3, 4), state_shape=5)
    with pytest.raises(ValueError, match=r"predictor\(x\) must return the state's shape"):
        skip(torch.randn(2, 3))
    with pytest.raises(TypeError, match="unknown option"):
        contdeq.DEQ(f, tolerance=1e-3)
    with pytest.raises(ValueError, match="solver must be one of"):
        contdeq.DEQ(f, solver="secant")
    with pytest.raises(ValueError, match="backward must be one of"):
        contdeq.DEQ(f, backward="adjoint")


def test_torch_spectral_norm_is_flagged() -> None:
    f = TanhCell(5, 3, dtype=torch.float32)
    nn.utils.parametrizations.spectral_norm(f.W)
    with pytest.warns(UserWarning, match="spectral_norm_cap"):
        contdeq.DEQ(f, state_shape=5)


def test_nonconvergence_of_layer_is_reported() -> None:
    layer = contdeq.DEQ(TanhCell(5, 3, lipschitz=0.99, dtype=torch.float32), state_shape=5,
                        max_steps=2)
    with pytest.warns(ConvergenceWarning):
        layer(torch.randn(4, 3))
    assert not layer.stats.forward.all_converged


@pytest.mark.parametrize("kind", ["DEQ", "SkipDEQ", "SkipRegDEQ", "NeuralODE"])
def test_state_dict_deepcopy_repr(kind: str) -> None:
    model = make_classifier(kind, width=8)  # f carries a spectral_norm_cap parametrization
    x = torch.randn(5, 64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    clone = make_classifier(kind, width=8)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(1.0)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    for other in (clone, copy.deepcopy(model)):
        with torch.no_grad():
            torch.testing.assert_close(other(x), expected)
    text = repr(model[1])
    assert type(model[1]).__name__ in text and ("solver=" in text or "t_end=" in text)


@pytest.mark.parametrize("kind", ["DEQ", "SkipDEQ", "SkipRegDEQ", "NeuralODE"])
def test_pickle_after_training_forward(kind: str) -> None:
    """A layer pickles (pickle and torch.save) even right after a training forward: the
    stats and aux-loss graphs of the last call are dropped. (torch refuses to pickle modules
    with parametrizations such as spectral_norm_cap; those go through state_dict.)"""
    f = TanhCell(5, 3, dtype=torch.float32)
    layer = {
        "DEQ": lambda: contdeq.DEQ(f, state_shape=5),
        "SkipDEQ": lambda: contdeq.SkipDEQ(f, nn.Linear(3, 5)),
        "SkipRegDEQ": lambda: contdeq.SkipRegDEQ(f, state_shape=5),
        "NeuralODE": lambda: contdeq.NeuralODE(f, state_shape=5),
    }[kind]()
    x = torch.randn(4, 3)
    layer(x)
    for restored in (pickle.loads(pickle.dumps(layer)), _torch_roundtrip(layer)):
        assert restored.stats is None
        layer.eval()
        restored.eval()
        with torch.no_grad():
            torch.testing.assert_close(restored(x), layer(x))


def _torch_roundtrip(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("solver", ["ode", "anderson"])
def test_one_scalar_state_per_sample_stays_batched(solver: str) -> None:
    """A layer whose state is ``(B,)`` (one scalar per sample) is solved per sample, not as one
    unbatched state (the solvers read a 1-D ``z0`` so), and its gradient matches the closed form
    ``dz/dx = s / (1 - a s)`` with ``s = sech^2(a z + x)`` (catches the 1-D state being coupled
    into one sample, or the backward losing the batch)."""

    class Scalar(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

        def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.a * z + x)

    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    layer = contdeq.DEQ(Scalar(), solver=solver, atol=1e-10, rtol=1e-10)
    with pytest.warns(DeprecationWarning, match="a 1-D x"):  # read so in this release
        z = layer(x)
    assert z.shape == (6,) and layer.stats.forward.converged.shape == (6,)
    torch.testing.assert_close(z, torch.tanh(0.5 * z + x), atol=1e-8, rtol=0)
    z.sum().backward()
    s = 1 - torch.tanh(0.5 * z + x).detach() ** 2
    torch.testing.assert_close(x.grad, s / (1 - 0.5 * s), rtol=1e-3, atol=0)


# -- 1-D inputs: B one-number samples for one more release, with a DeprecationWarning --------
class Elementwise(nn.Module):
    """``f(z, x) = tanh(a z + x)`` elementwise: ``z`` shaped like ``x``, ``(B,)`` or ``(B, 1)``."""

    def __init__(self, a: float = 0.5) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a * z + x)


class TwoScales(nn.Module):
    """``f(zs, x)`` on states ``(B, 2)`` and ``(B, 3)``, ``x`` ``(B,)`` or ``(B, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, 0.3], dtype=torch.float64))

    def forward(self, zs: tuple[torch.Tensor, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.reshape(x.shape[0], 1)
        return tuple(torch.tanh(a * z + x) for a, z in zip(self.a, zs, strict=True))


TIGHT = {"atol": 1e-10, "rtol": 1e-10}
SCALES = {"state_shapes": ((2,), (3,))}
#: Every kind of layer that takes ``x``, built on a cell that accepts ``(B,)`` and ``(B, 1)``.
LAYERS_OF_1D_INPUTS = {
    "DEQ": lambda: contdeq.DEQ(Elementwise(), **TIGHT),
    "DEQ-anderson": lambda: contdeq.DEQ(Elementwise(), solver="anderson", **TIGHT),
    "SkipDEQ": lambda: contdeq.SkipDEQ(Elementwise(), nn.Tanh(), **TIGHT),
    "SkipRegDEQ": lambda: contdeq.SkipRegDEQ(Elementwise(), **TIGHT),
    "NeuralODE": lambda: contdeq.NeuralODE(Elementwise()),
    "WeightTied": lambda: contdeq.WeightTied(Elementwise(), depth=5),
    "NeuralSDE": lambda: contdeq.NeuralSDE(Elementwise(), Elementwise(0.1)),
    "MultiScaleDEQ": lambda: contdeq.MultiScaleDEQ(TwoScales(), **SCALES, **TIGHT),
    "MultiScaleSkipRegDEQ": lambda: contdeq.MultiScaleSkipRegDEQ(TwoScales(), **SCALES, **TIGHT),
    "MultiScaleNeuralODE": lambda: contdeq.MultiScaleNeuralODE(TwoScales(), **SCALES),
    "MultiScaleWeightTied": lambda: contdeq.MultiScaleWeightTied(TwoScales(), 4, **SCALES),
}


def _at_callers_line(warning: warnings.WarningMessage) -> bool:
    """The warning names this file (the caller's line); under mutation testing mutmut's
    trampoline is a frame between this file and contdeq, and is named instead."""
    return warning.filename == __file__ or (
        "MUTANT_UNDER_TEST" in os.environ and warning.filename.endswith("trampoline.py"))


def _flat(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A layer's output ``(B, ...)`` (or tuple of them) as one ``(B, -1)`` tensor."""
    parts = out if isinstance(out, tuple) else (out,)
    return torch.cat([part.reshape(part.shape[0], -1) for part in parts], dim=1)


@pytest.mark.parametrize("kind", list(LAYERS_OF_1D_INPUTS))
def test_a_1d_input_warns_and_is_read_as_one_number_samples(kind: str) -> None:
    """Every layer reads a 1-D ``x`` ``(B,)`` as ``B`` one-number samples for one more
    release, warning ``DeprecationWarning`` at the caller's line with the future reading and
    both explicit spellings; the result is that of ``x[:, None]``, which does not warn."""
    torch.manual_seed(0)
    layer = LAYERS_OF_1D_INPUTS[kind]().eval()
    x = torch.randn(5, dtype=torch.float64)
    with pytest.warns(DeprecationWarning,
                      match=r"a 1-D x of shape \(5,\) passed to \w+ is read as 5 samples of one "
                            r"number each; a future release will read it as one unbatched "
                            r"sample.*Pass x\[:, None\].*or x\[None\]") as record:
        old = layer(x)
    assert _at_callers_line(record[0])
    assert f"passed to {type(layer).__name__} " in str(record[0].message)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="a 1-D x", category=DeprecationWarning)
        explicit = layer(x[:, None])
    assert _flat(old).shape == _flat(explicit).shape
    torch.testing.assert_close(_flat(old), _flat(explicit), atol=1e-12, rtol=0)


def test_vmap_warns_when_the_per_call_x_is_1d_only() -> None:
    """Under ``torch.func.vmap`` the layer sees the per-call ``x``: ``(N, B, 1)`` inputs give
    ``(B, 1)`` calls (no warning), ``(N, B)`` inputs ``(B,)`` calls, read as ``B`` one-number
    samples as outside vmap, so they warn (at the caller's line); both give the loop's
    results."""
    layer = LAYERS_OF_1D_INPUTS["DEQ-anderson"]().eval()
    xs = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        loop = torch.stack([layer(x[:, None]) for x in xs])
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="a 1-D x", category=DeprecationWarning)
            mapped = torch.func.vmap(layer)(xs[..., None])
        with pytest.warns(DeprecationWarning, match=r"a 1-D x of shape \(4,\)") as record:
            mapped_1d = torch.func.vmap(layer)(xs)
    assert _at_callers_line(record[0])
    torch.testing.assert_close(mapped, loop, atol=1e-12, rtol=0)
    torch.testing.assert_close(mapped_1d, loop[..., 0], atol=1e-12, rtol=0)
