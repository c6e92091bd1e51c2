"""The equilibrium layer composed of small objects: initial-state policies, state structures,
dynamics modifiers; the short names as builders; combinations no class existed for; new
policies and modifiers as one class plus one registration; renamed keywords; state_dict keys
of models saved before the composition."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import contdeq
from contdeq.nn import (
    DEQ,
    INITIAL_STATES,
    MODIFIERS,
    FZero,
    InitialState,
    LyapunovFunction,
    LyapunovProjection,
    Modifier,
    Noise,
    Predictor,
    Scales,
)
from contdeq.nn.lyapunov import lyapunov_value
from contdeq.solvers import flatten_states

from .layer_models import TanhCell

F64 = torch.float64
D = 4
SHAPES = ((2,), (3,))
N = 5
TIGHT = {"atol": 1e-10, "rtol": 1e-10, "backward_rtol": 1e-10, "backward_max_steps": 500}


class TwoScales(nn.Module):
    """``f(zs, x) = (tanh(A z0 + C z1 + U x), tanh(B z1 + E z0 + V x))`` with ``x``
    ``(B, 4)``, scales ``(B, 2)`` and ``(B, 3)``; ``A, B, C, E`` of norm ``gain`` (contractive
    for the default 0.3)."""

    def __init__(self, gain: float = 0.3) -> None:
        super().__init__()
        self.a, self.c, self.u = (nn.Linear(2, 2, dtype=F64), nn.Linear(3, 2, bias=False,
                                  dtype=F64), nn.Linear(D, 2, dtype=F64))
        self.b, self.e, self.v = (nn.Linear(3, 3, dtype=F64), nn.Linear(2, 3, bias=False,
                                  dtype=F64), nn.Linear(D, 3, dtype=F64))
        with torch.no_grad():
            for lin in (self.a, self.c, self.b, self.e):
                lin.weight.mul_(gain / torch.linalg.matrix_norm(lin.weight, ord=2))

    def forward(self, zs: tuple[Tensor, ...], x: Tensor) -> tuple[Tensor, Tensor]:
        z0, z1 = zs
        return (torch.tanh(self.a(z0) + self.c(z1) + self.u(x)),
                torch.tanh(self.b(z1) + self.e(z0) + self.v(x)))


class TwoScalePredictor(nn.Module):
    """``x`` ``(B, 4)`` -> ``((B, 2), (B, 3))``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, N, dtype=F64)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.lin(x)
        return y[:, :2], y[:, 2:]


def flat(zs: tuple[Tensor, ...]) -> Tensor:
    return flatten_states(zs, shapes=SHAPES, name="z")[0]


def parameter_grads(layer: nn.Module, x: Tensor) -> list[Tensor]:
    """Gradients of ``sum(z*^2) + aux`` for every parameter (zeros where none flows)."""
    out = layer(x)
    loss = sum(o.square().sum() for o in (out if isinstance(out, tuple) else (out,)))
    aux = contdeq.aux_loss(layer)
    params = list(layer.parameters())
    grads = torch.autograd.grad(loss + aux, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


# -- the short names are builders of the composed layer -------------------------------------
@pytest.mark.parametrize("solver", ["ode", "anderson"])
@pytest.mark.parametrize("seed", [0, 1])
def test_short_names_are_the_composition(solver: str, seed: int) -> None:
    """``SkipDEQ``, ``SkipRegDEQ``, ``MultiScaleSkipDEQ`` give exactly the outputs, NFE, skip
    terms and gradients of ``DEQ`` with the matching policy and structure: catches a builder
    that configures anything beyond the composition."""
    torch.manual_seed(seed)
    f, p = TanhCell(D, D), nn.Linear(D, D, dtype=F64)
    cell, pred = TwoScales(), TwoScalePredictor()
    pairs = [
        (contdeq.SkipDEQ(f, p, skip_weight=0.5, skip_norm="l1", solver=solver, **TIGHT),
         DEQ(f, init=Predictor(p, weight=0.5, norm="l1"), solver=solver, **TIGHT)),
        (contdeq.SkipRegDEQ(f, skip_detach=False, solver=solver, **TIGHT),
         DEQ(f, init=FZero(detach=False), solver=solver, **TIGHT)),
        (contdeq.MultiScaleSkipDEQ(cell, pred, state_shapes=SHAPES, solver=solver, **TIGHT),
         DEQ(cell, init=Predictor(pred), structure=Scales(SHAPES), solver=solver, **TIGHT)),
    ]
    x = torch.randn(5, D, dtype=F64)
    for named, composed in pairs:
        assert isinstance(named, DEQ)
        assert list(named.state_dict()) == list(composed.state_dict())
        grads = parameter_grads(named, x), parameter_grads(composed, x)
        assert named.stats.forward.nfe == composed.stats.forward.nfe
        assert set(named.aux_terms) == set(composed.aux_terms) == {"skip"}
        for a, b in zip(*grads, strict=True):
            assert torch.equal(a, b)


# -- three combinations that had no class ---------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_multiscale_skip_deq(seed: int) -> None:
    """A noisy multi-scale Skip DEQ: tuples in and out, the skip term trains the predictor,
    training starts off the prediction (noise) yet reaches the noiseless layer's equilibrium
    and implicit gradient (contractive f), and eval mode is the noiseless layer exactly:
    catches a modifier lost with a non-default policy or structure."""
    torch.manual_seed(seed)
    cell, pred = TwoScales(), TwoScalePredictor()
    options = {"structure": Scales(SHAPES), "init": Predictor(pred), **TIGHT}
    noisy = DEQ(cell, modifiers=(Noise(0.5, time=2.0, dt=0.05),), **options)
    plain = contdeq.MultiScaleSkipDEQ(cell, pred, state_shapes=SHAPES, **TIGHT)
    x = torch.randn(6, D, dtype=F64)
    torch.manual_seed(100 + seed)
    starts = [noisy.initial_state(x, None)[0].detach() for _ in range(4)]
    prediction = flat(pred(x)).detach()
    assert max(float((s - prediction).abs().max()) for s in starts) > 1e-3
    out, ref = noisy(x), plain(x)
    assert isinstance(out, tuple) and [t.shape for t in out] == [(6, 2), (6, 3)]
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    assert "skip" in noisy.aux_terms
    g_noisy = parameter_grads(noisy, x)
    g_plain = parameter_grads(plain, x)
    assert any(float(g.abs().max()) > 0 for g in g_noisy[-2:])  # the predictor's
    for a, b in zip(g_noisy, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    noisy.eval()
    plain.eval()
    with torch.no_grad():
        for a, b in zip(noisy(x), plain(x), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("solver", ["anderson", "picard"])
def test_lyapunov_multiscale_deq(seed: int, solver: str) -> None:
    """A Lyapunov multi-scale DEQ: for every sample ``V(z) <= V(z0)`` (the guarantee, here
    with a non-contractive ``f`` whose nominal iteration raises ``V``, and a solver stopped
    after 3 steps), and with a contractive ``f`` a converged solve ends at the equilibrium of
    the nominal multi-scale ``f``: catches a projection that is skipped on tuple states."""
    torch.manual_seed(seed)
    v0 = LyapunovFunction(N, (8,)).double()
    x = 2 * torch.randn(16, D, dtype=F64)
    for gain, steps in ((3.0, 3), (0.3, 300)):
        cell = TwoScales(gain)
        layer = DEQ(cell, structure=Scales(SHAPES), modifiers=(LyapunovProjection(v0),),
                    solver=solver, max_steps=steps, atol=1e-9, rtol=1e-9,
                    backward_method="gmres", on_nonconvergence="ignore")
        assert layer.lyapunov is v0 and "lyapunov.icnn.inputs.0.weight" in layer.state_dict()
        z = flat(layer(x))
        z0 = layer.zeros(x)
        with torch.no_grad():
            v_end = lyapunov_value(lambda s, c=layer.f: c(s, x), v0, z)
            v_start = lyapunov_value(lambda s, c=layer.f: c(s, x), v0, z0)
        assert bool((v_end <= v_start).all())
    assert layer.stats.forward.all_converged
    with torch.no_grad():
        torch.testing.assert_close(layer.f(z, x), z, rtol=0, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lyapunov_skip_deq(seed: int) -> None:
    """A Lyapunov Skip DEQ: the solve starts at ``predictor(x)`` and ``V(z) <= V(predictor(x))``
    per sample; the skip term is there; at convergence output and gradients are the plain Skip
    DEQ's (the implicit gradient of ``f`` at the same equilibrium): catches the projection or
    the predicted start dropped when combined."""
    torch.manual_seed(seed)
    f, p = TanhCell(D, D, lipschitz=0.9), nn.Linear(D, D, dtype=F64)
    v0 = LyapunovFunction(D, (8,)).double()
    layer = DEQ(f, state_shape=D, init=Predictor(p), modifiers=(LyapunovProjection(v0, 2.0),),
                solver="anderson", max_steps=400, **TIGHT)
    plain = contdeq.SkipDEQ(f, p, solver="anderson", max_steps=400, **TIGHT)
    x = torch.randn(6, D, dtype=F64)
    z = layer(x)
    with torch.no_grad():
        v_end = lyapunov_value(lambda s: f(s, x), v0, z)
        v_start = lyapunov_value(lambda s: f(s, x), v0, p(x))
    assert bool((v_end <= v_start).all()) and "skip" in layer.aux_terms
    wild = TanhCell(D, D, lipschitz=3.0)  # its nominal iteration raises V
    stopped = DEQ(wild, state_shape=D, init=Predictor(p), solver="picard", max_steps=3,
                  modifiers=(LyapunovProjection(v0, 2.0),), on_nonconvergence="ignore")
    x_wide = 2 * torch.randn(32, D, dtype=F64)
    with torch.no_grad():
        v_end = lyapunov_value(lambda s: wild(s, x_wide), v0, stopped(x_wide))
        v_start = lyapunov_value(lambda s: wild(s, x_wide), v0, p(x_wide))
    assert bool((v_end <= v_start).all())
    torch.testing.assert_close(z, plain(x), rtol=1e-7, atol=1e-8)
    g_layer = parameter_grads(layer, x)
    g_plain = parameter_grads(plain, x)
    named = [n for n, _ in layer.named_parameters()]
    plain_grads = dict(zip([n for n, _ in plain.named_parameters()], g_plain, strict=True))
    for name, g in zip(named, g_layer, strict=True):
        if name in plain_grads:
            torch.testing.assert_close(g, plain_grads[name], rtol=1e-5, atol=1e-8)


def test_modifiers_combine_with_the_short_names() -> None:
    """``LyapunovDEQ(..., modifiers=(Noise(...),))`` keeps both and refuses a discrete solver
    for the noise: catches a builder that drops the user's modifiers."""
    layer = contdeq.LyapunovDEQ(TanhCell(D, D), D, hidden=(8,), modifiers=(Noise(0.1),))
    assert [type(m) for m in layer.modifiers] == [Noise, LyapunovProjection]
    with pytest.raises(ValueError, match="needs solver='ode'"):
        DEQ(TanhCell(D, D), solver="anderson", modifiers=(Noise(0.1),))


# -- a new policy or modifier: one class, one registration ---------------------------------
class Mean(InitialState):
    """``z0``: every sample starts at the batch mean of ``f(0, x)`` (a toy policy)."""

    def __call__(self, layer: DEQ, x: Tensor) -> tuple[Tensor, None]:
        out = layer.f(layer.zeros(x), x)
        return out.mean(dim=0, keepdim=True).expand_as(out).contiguous(), None


class Halfway(Modifier):
    """Starts the solve halfway between the policy's start and ``f`` of it (a toy modifier)."""

    def start(self, layer: DEQ, x: Tensor, z0: Tensor) -> Tensor:
        return 0.5 * (z0 + layer.f(z0, x))


def test_new_policy_and_modifier_are_one_registration() -> None:
    """A policy and a modifier defined outside the package work after one ``register`` call
    each, by name (the policy) and as objects, with the right start: catches a layer that
    only knows the built-in ones."""
    INITIAL_STATES.register("mean", Mean)
    MODIFIERS.register("halfway", Halfway)
    try:
        torch.manual_seed(0)
        f = TanhCell(D, D)
        x = torch.randn(5, D, dtype=F64)
        layer = DEQ(f, init="mean", modifiers=(MODIFIERS["halfway"](),), **TIGHT)
        with torch.no_grad():
            start = f(torch.zeros_like(x), x).mean(0, keepdim=True).expand_as(x)
            expected = 0.5 * (start + f(start, x))
            torch.testing.assert_close(layer.initial_state(x, None)[0], expected)
            torch.testing.assert_close(layer(x), contdeq.DEQ(f, **TIGHT)(x), rtol=1e-8,
                                       atol=1e-9)
    finally:
        INITIAL_STATES.unregister("mean")
        MODIFIERS.unregister("halfway")
    with pytest.raises(ValueError, match="init must be one of"):
        DEQ(TanhCell(D, D), init="mean")


def test_bad_compositions_are_named() -> None:
    with pytest.raises(TypeError, match="init must be an initial-state policy"):
        DEQ(TanhCell(D, D), init=nn.Linear(D, D))
    with pytest.raises(TypeError, match="modifiers must be a tuple of dynamics modifiers"):
        DEQ(TanhCell(D, D), modifiers=(lambda z: z,))
    with pytest.raises(TypeError, match="structure must be"):
        DEQ(TanhCell(D, D), structure=(2, 3))
    with pytest.raises(TypeError, match=r"state_shape=\.\.\. or structure=\.\.\., not both"):
        DEQ(TanhCell(D, D), state_shape=D, structure=Scales(SHAPES))
    with pytest.raises(TypeError, match=r"called as f\(zs, x\) with zs a tuple"):
        DEQ(lambda zs, x: zs, structure=Scales(SHAPES))


def test_solver_object_is_the_same_solve() -> None:
    """``DEQ(f, solver=ForwardSolver(...))`` solves exactly as the string and keywords do, and
    refuses keywords beside an object: catches options of the object being ignored."""
    torch.manual_seed(0)
    f, x = TanhCell(D, D), torch.randn(5, D, dtype=F64)
    by_object = DEQ(f, solver=contdeq.ForwardSolver("anderson", atol=1e-9, rtol=1e-9))
    by_name = DEQ(f, solver="anderson", atol=1e-9, rtol=1e-9)
    assert torch.equal(by_object(x), by_name(x))
    assert by_object.stats.forward.nfe == by_name.stats.forward.nfe
    with pytest.raises(TypeError, match="set its options on the object"):
        DEQ(f, solver=contdeq.ForwardSolver("anderson"), atol=1e-9)


# -- a defence is a modifier entered for a block --------------------------------------------
def test_using_enters_and_leaves_a_modifier() -> None:
    """``layer.using(m)`` applies ``m``'s solver and backward hooks within the block only,
    also after an exception, without touching the layer's objects."""

    class Jacobian_free(Modifier):
        def backward(self, base: contdeq.BackwardMode, training: bool) -> contdeq.BackwardMode:
            return contdeq.JFB()

    layer = DEQ(TanhCell(D, D))
    saved = (layer.solver, layer.backward_mode)
    with pytest.raises(RuntimeError, match="boom"), layer.using(Jacobian_free()):
        assert isinstance(layer.solver_and_backward()[1], contdeq.JFB)
        assert (layer.solver, layer.backward_mode) == saved
        raise RuntimeError("boom")
    assert layer.solver_and_backward() == saved


# -- renamed keywords -----------------------------------------------------------------------
def test_old_keyword_spellings_warn_and_keep_working() -> None:
    """``backward_tol`` and ``max_num_steps`` still work, warn ``DeprecationWarning`` naming
    the new keyword at the caller's line, and configure what the new spelling does; passing
    both spellings is refused."""
    f = TanhCell(D, D)
    with pytest.warns(DeprecationWarning, match="use backward_rtol=") as record:
        old = DEQ(f, backward_tol=1e-7)
    assert record[0].filename == __file__
    assert old.backward_mode == DEQ(f, backward_rtol=1e-7).backward_mode
    with pytest.warns(DeprecationWarning, match="use backward_rtol="):
        contdeq.SkipRegDEQ(f, backward_tol=1e-7)
    with pytest.raises(TypeError, match=r"pass backward_rtol=\.\.\. only"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            DEQ(f, backward_tol=1e-7, backward_rtol=1e-7)
    with pytest.raises(TypeError, match="not with backward_rtol"):
        DEQ(f, backward=contdeq.Implicit(), backward_rtol=1e-7)
    with pytest.raises(ValueError, match="backward_rtol must be finite and > 0"):
        DEQ(f, backward_rtol=-1.0)
    with pytest.warns(DeprecationWarning, match="use max_steps=") as record:
        node = contdeq.NeuralODE(f, max_num_steps=7)
    assert record[0].filename == __file__
    assert node.max_steps == 7 == contdeq.NeuralODE(f, max_steps=7).max_steps
    with pytest.raises(TypeError, match=r"pass max_steps=\.\.\. only"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        contdeq.NeuralODE(f, max_num_steps=7, max_steps=8)


# -- checkpoints of models saved before the composition --------------------------------------
#: ``state_dict`` keys and shapes of the layers as built before the composition (recorded
#: from main at 6468fd8 with the builders below): a checkpoint saved then loads now.
SAVED_KEYS = {
    "DEQ": {"f.W.weight": (4, 4), "f.U.weight": (4, 4), "f.U.bias": (4,)},
    "SkipDEQ": {"f.W.weight": (4, 4), "f.U.weight": (4, 4), "f.U.bias": (4,),
                "predictor.weight": (4, 4), "predictor.bias": (4,)},
    "SkipRegDEQ": {"f.W.weight": (4, 4), "f.U.weight": (4, 4), "f.U.bias": (4,)},
    "LyapunovDEQ": {"f.W.weight": (4, 4), "f.U.weight": (4, 4), "f.U.bias": (4,),
                    "lyapunov.icnn.inputs.0.weight": (8, 4), "lyapunov.icnn.inputs.0.bias": (8,),
                    "lyapunov.icnn.inputs.1.weight": (1, 4), "lyapunov.icnn.inputs.1.bias": (1,),
                    "lyapunov.icnn.hidden.0.parametrizations.weight.original": (1, 8),
                    "orthogonal.parametrizations.weight.original": (4, 4),
                    "orthogonal.parametrizations.weight.0.base": (4, 4)},
    "NeuralODE": {"f.W.weight": (4, 4), "f.U.weight": (4, 4), "f.U.bias": (4,)},
    "WeightTied": {"f.W.weight": (4, 4), "f.U.weight": (4, 4), "f.U.bias": (4,),
                   "masks.W_weight": (3, 4, 4), "masks.U_weight": (3, 4, 4)},
    "MultiScaleDEQ": {"f.f.a.weight": (2, 2), "f.f.a.bias": (2,), "f.f.b.weight": (3, 3),
                      "f.f.b.bias": (3,)},
    "MultiScaleSkipDEQ": {"f.f.a.weight": (2, 2), "f.f.a.bias": (2,), "f.f.b.weight": (3, 3),
                          "f.f.b.bias": (3,), "predictor.p.weight": (5, 4),
                          "predictor.p.bias": (5,)},
    "MultiScaleSkipRegDEQ": {"f.f.a.weight": (2, 2), "f.f.a.bias": (2,),
                             "f.f.b.weight": (3, 3), "f.f.b.bias": (3,)},
    "MultiScaleNeuralODE": {"f.f.a.weight": (2, 2), "f.f.a.bias": (2,),
                            "f.f.b.weight": (3, 3), "f.f.b.bias": (3,)},
    "MultiScaleWeightTied": {"f.f.a.weight": (2, 2), "f.f.a.bias": (2,),
                             "f.f.b.weight": (3, 3), "f.f.b.bias": (3,),
                             "masks.f_a_weight": (2, 2, 2), "masks.f_b_weight": (2, 3, 3)},
}


class PairCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(3, 3)

    def forward(self, zs: tuple[Tensor, ...], x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tanh(self.a(zs[0])), torch.tanh(self.b(zs[1]))


class PairPredictor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.p(x)
        return y[:, :2], y[:, 2:]


def build(name: str) -> nn.Module:
    cell = TanhCell(D, D)
    shapes = [(2,), (3,)]
    return {
        "DEQ": lambda: contdeq.DEQ(cell),
        "SkipDEQ": lambda: contdeq.SkipDEQ(cell, nn.Linear(D, D, dtype=F64)),
        "SkipRegDEQ": lambda: contdeq.SkipRegDEQ(cell),
        "LyapunovDEQ": lambda: contdeq.LyapunovDEQ(cell, D, hidden=(8,)),
        "NeuralODE": lambda: contdeq.NeuralODE(cell),
        "WeightTied": lambda: contdeq.WeightTied(cell, 3, masks="distinct", sparsity=0.5),
        "MultiScaleDEQ": lambda: contdeq.MultiScaleDEQ(PairCell(), state_shapes=shapes),
        "MultiScaleSkipDEQ": lambda: contdeq.MultiScaleSkipDEQ(PairCell(), PairPredictor(),
                                                               state_shapes=shapes),
        "MultiScaleSkipRegDEQ": lambda: contdeq.MultiScaleSkipRegDEQ(PairCell(),
                                                                     state_shapes=shapes),
        "MultiScaleNeuralODE": lambda: contdeq.MultiScaleNeuralODE(PairCell(),
                                                                   state_shapes=shapes),
        "MultiScaleWeightTied": lambda: contdeq.MultiScaleWeightTied(
            PairCell(), 2, state_shapes=shapes, masks="shared", sparsity=0.5),
    }[name]()


@pytest.mark.parametrize("name", sorted(SAVED_KEYS))
def test_state_dict_keys_of_saved_models_are_unchanged(name: str) -> None:
    """The composed layers have the ``state_dict`` keys and shapes the subclassed ones had,
    and a state saved from one model loads strictly into another: catches a policy's or
    modifier's network registered under a new name (old checkpoints would not load)."""
    torch.manual_seed(0)
    layer = build(name)
    state = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert state == SAVED_KEYS[name]
    torch.manual_seed(1)
    other = build(name)
    other.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, strict=True)
    for (k, a), b in zip(layer.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


# -- the batch convention of 1-D inputs ------------------------------------------------------
@pytest.mark.parametrize("solver", ["ode", "anderson"])
def test_one_dimensional_inputs_follow_the_documented_convention(solver: str) -> None:
    """docs/layers.md: a layer reads a 1-D ``x`` ``(B,)`` as ``B`` samples (per-sample stats;
    with a DeprecationWarning, as a future release changes that),
    the functions read a 1-D state as one unbatched sample (one stat), and both reach the
    same equilibrium: catches either convention changing silently."""
    x = torch.randn(6, dtype=F64)

    class Scalar(nn.Module):
        def forward(self, z: Tensor, x: Tensor) -> Tensor:
            return torch.tanh(0.5 * z + x)

    layer = DEQ(Scalar(), solver=solver, atol=1e-10, rtol=1e-10)
    with pytest.warns(DeprecationWarning, match="a future release will read it as one"):
        z = layer(x)
    assert z.shape == (6,) and layer.stats.forward.converged.shape == (6,)
    z0 = torch.zeros(6, dtype=F64)
    if solver == "ode":
        z_fn, stats = contdeq.solvers.steady_state(lambda t, s: torch.tanh(0.5 * s + x) - s, z0,
                                                   method="ptc", atol=1e-10, rtol=1e-10)
    else:
        z_fn, stats = contdeq.solvers.fixed_point(lambda s: torch.tanh(0.5 * s + x), z0,
                                                  method=solver, atol=1e-10, rtol=1e-10)
    assert stats.converged.shape == (1,)
    torch.testing.assert_close(z_fn, z, rtol=0, atol=1e-8)
