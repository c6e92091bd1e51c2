"""Multi-scale layers on tuple states, the tuple-state solver entry points, the image building
blocks and the procedural image set."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

import contdeq
from contdeq.solvers import fixed_point, flatten_states, steady_state, unflatten_states

TIGHT = {"atol": 1e-12, "rtol": 1e-12}
BACKWARD = {"backward_rtol": 1e-12, "backward_max_steps": 500}
SHAPES = ((2, 4, 4), (2, 2, 2))


class TinyCell(nn.Module):
    """Contractive 2-scale ``f(zs, x)``: ``(tanh(A z0 + U x + up(D z1)),
    tanh(B z1 + E pool(z0)))``, every weight acting on ``zs`` of operator norm <= 0.3."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1, dtype=dtype)
        self.b = nn.Conv2d(2, 2, 1, dtype=dtype)
        self.down = nn.Conv2d(2, 2, 1, bias=False, dtype=dtype)
        self.up = nn.Conv2d(2, 2, 1, bias=False, dtype=dtype)
        self.u = nn.Conv2d(1, 2, 1, dtype=dtype)
        with torch.no_grad():
            for conv in (self.a, self.b, self.down, self.up):
                w = conv.weight
                w.mul_(0.3 / (torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2)
                              * w.shape[-1]))

    def forward(self, zs: tuple[Tensor, ...], x: Tensor) -> tuple[Tensor, Tensor]:
        z0, z1 = zs
        up = F.interpolate(self.up(z1), scale_factor=2, mode="nearest")
        return (torch.tanh(self.a(z0) + self.u(x) + up),
                torch.tanh(self.b(z1) + self.down(F.avg_pool2d(z0, 2))))


class TinyPredictor(nn.Module):
    """``x`` ``(B, 1, 4, 4)`` -> ``((B, 2, 4, 4), (B, 2, 2, 2))``."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.fine = nn.Conv2d(1, 2, 1, dtype=dtype)
        self.coarse = nn.Conv2d(1, 2, 2, stride=2, dtype=dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.fine(x), self.coarse(x)


def make_layer(kind: str, solver: str = "anderson", **options: object) -> nn.Module:
    opts = {"solver": solver, "max_steps": 3000 if solver == "ode" else 300, **TIGHT,
            **BACKWARD, "state_shapes": SHAPES, **options}
    cell = TinyCell()
    if kind == "DEQ":
        return contdeq.MultiScaleDEQ(cell, **opts)
    if kind == "SkipDEQ":
        return contdeq.MultiScaleSkipDEQ(cell, TinyPredictor(), **opts)
    return contdeq.MultiScaleSkipRegDEQ(cell, **opts)


def x_batch(batch: int = 2) -> Tensor:
    return torch.randn(batch, 1, 4, 4, dtype=torch.float64)


# -- flatten / unflatten ---------------------------------------------------------------------


def test_flatten_unflatten_round_trip() -> None:
    zs = (torch.randn(3, 2, 4, 4), torch.randn(3, 5), torch.randn(3, 1, 2, 2))
    flat, shapes = flatten_states(list(zs))
    assert flat.shape == (3, 32 + 5 + 4) and shapes == ((2, 4, 4), (5,), (1, 2, 2))
    back = unflatten_states(flat, shapes)
    assert isinstance(back, tuple)
    for a, b in zip(zs, back, strict=True):
        assert torch.equal(a, b)
        assert b.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()  # views
    assert unflatten_states(flat, [[2, 4, 4], 5, (1, 2, 2)])[1].shape == (3, 5)


def test_flatten_unflatten_errors() -> None:
    a = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="zs must be a tuple of tensors"):
        flatten_states(a)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        flatten_states(())
    with pytest.raises(TypeError, match=r"zs\[1\] \(scale 1\) must be a torch.Tensor"):
        flatten_states((a, 3.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"zs\[1\] \(scale 1\) has batch size 4"):
        flatten_states((a, torch.zeros(4, 3)))
    with pytest.raises(TypeError, match=r"zs\[1\] \(scale 1\) has dtype torch.float64"):
        flatten_states((a, torch.zeros(2, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"zs\[1\] \(scale 1\) is on meta"):
        flatten_states((a, torch.zeros(2, 3, device="meta")))
    with pytest.raises(ValueError, match=r"zs\[0\] \(scale 0\) must have shape \(B, \.\.\.\)"):
        flatten_states((torch.zeros(2),))
    with pytest.raises(ValueError, match=r"out\[1\] \(scale 1\) must have shape \(2, 4\)"):
        flatten_states((a, a), shapes=[(3,), (4,)], name="out")
    with pytest.raises(ValueError, match="out must have 3 tensors"):
        flatten_states((a, a), shapes=[(3,), (3,), (3,)], name="out")
    with pytest.raises(ValueError, match=r"flat must have shape \(B, 7\)"):
        unflatten_states(torch.zeros(2, 6), [(3,), (4,)])
    with pytest.raises(TypeError, match=r"flat must be a torch\.Tensor"):
        unflatten_states([1.0], [(1,)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shapes must be a non-empty sequence"):
        unflatten_states(torch.zeros(2, 6), [(3, 0)])


def _tuple_problem() -> tuple[tuple[Tensor, Tensor], object, object]:
    c = torch.linspace(0.1, 0.5, 3, dtype=torch.float64)[:, None]
    zs = (torch.zeros(3, 2, 2, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64))

    def g(zs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        assert isinstance(zs, tuple) and zs[0].shape == (3, 2, 2)
        return 0.5 * torch.tanh(zs[0]) + 1, c * zs[1] + zs[0].mean(dim=(1, 2))[:, None]

    def flat_g(z: Tensor) -> Tensor:
        return flatten_states(g(unflatten_states(z, ((2, 2), (3,)))))[0]

    return zs, g, flat_g


def test_tuple_z0_in_fixed_point_and_steady_state() -> None:
    zs, g, flat_g = _tuple_problem()
    flat0 = flatten_states(zs)[0]
    for method in ("anderson", "picard"):
        z, stats = fixed_point(g, zs, method=method, **TIGHT, max_steps=200)
        ref, ref_stats = fixed_point(flat_g, flat0, method=method, **TIGHT, max_steps=200)
        assert isinstance(z, tuple) and [t.shape for t in z] == [(3, 2, 2), (3, 3)]
        torch.testing.assert_close(flatten_states(z)[0], ref)
        assert stats.nfe == ref_stats.nfe and stats.all_converged
    z, stats = steady_state(lambda t, zs: tuple(a - b for a, b in zip(g(zs), zs, strict=True)),
                            z0=zs, atol=1e-9, rtol=1e-9)
    assert isinstance(z, tuple) and stats.all_converged
    for a, b in zip(g(z), z, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


def test_tuple_solver_errors_name_the_scale() -> None:
    zs, g, _ = _tuple_problem()
    with pytest.raises(TypeError, match="g's output must be a tuple of tensors"):
        fixed_point(lambda zs: zs[0], zs)
    with pytest.raises(ValueError, match=r"g's output\[1\] \(scale 1\) must have shape \(3, 3\)"):
        fixed_point(lambda zs: (zs[0], zs[1][:, :2]), zs)
    with pytest.raises(ValueError, match="func's output must have 2 tensors"):
        steady_state(lambda t, zs: zs[:1], zs)
    with pytest.raises(ValueError, match=r"z0\[1\] \(scale 1\) has batch size 2"):
        fixed_point(g, (zs[0], zs[1][:2]))


# -- layers: gradients -----------------------------------------------------------------------


def gradcheck_layer(layer: nn.Module, fast_mode: bool = False) -> None:
    """gradcheck of every scale of z* w.r.t. x and every parameter of f."""
    named = [(n, p) for n, p in layer.named_parameters() if n.startswith("f.")]
    names = [n for n, _ in named]
    params = [p.detach().clone().requires_grad_() for _, p in named]
    x = x_batch().requires_grad_()

    def fn(x: Tensor, *ps: Tensor) -> tuple[Tensor, ...]:
        return functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4,
                                    fast_mode=fast_mode)


@pytest.mark.parametrize(("kind", "solver"), [("DEQ", "ode"), ("DEQ", "anderson"),
                                              ("SkipDEQ", "anderson"), ("SkipRegDEQ", "picard")])
def test_gradcheck(kind: str, solver: str) -> None:
    # the steady state by pseudo-transient continuation: ~30 f calls to 1e-12 (dopri5: ~2500)
    options = {"method": "ptc"} if solver == "ode" else {}
    # the skip variants share the DEQ's gradient path: a random projection suffices there
    gradcheck_layer(make_layer(kind, solver, **options), fast_mode=kind != "DEQ")


def test_implicit_matches_unrolled() -> None:
    x = x_batch(3).requires_grad_()
    target = (torch.randn(3, *SHAPES[0], dtype=torch.float64),
              torch.randn(3, *SHAPES[1], dtype=torch.float64))
    grads = {}
    for mode in ("implicit", "unrolled"):
        torch.manual_seed(1)
        layer = make_layer("DEQ", "ode", backward=mode, atol=1e-11, rtol=1e-11)
        x.grad = None
        zs = layer(x)
        loss = sum((z - t).pow(2).mean() for z, t in zip(zs, target, strict=True))
        loss.backward()
        assert layer.stats.forward.steps > 10
        grads[mode] = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    for gi, gu in zip(grads["implicit"], grads["unrolled"], strict=True):
        torch.testing.assert_close(gi, gu, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("kind", ["DEQ", "SkipDEQ", "SkipRegDEQ"])
def test_equilibrium_per_scale(kind: str) -> None:
    layer = make_layer(kind)
    x = x_batch(4)
    zs = layer(x)
    assert isinstance(zs, tuple) and [tuple(z.shape[1:]) for z in zs] == list(SHAPES)
    for fz, z in zip(layer.f.f(zs, x), zs, strict=True):
        torch.testing.assert_close(fz, z, atol=1e-10, rtol=0)
    assert layer.stats.forward.all_converged


def test_multiscale_cell_equilibrium_and_training_step() -> None:
    cell = contdeq.MultiScaleCell([4, 8], 4, normalization="weight").double()
    layer = contdeq.MultiScaleDEQ(cell, state_shapes=cell.state_shapes(8, 8), atol=1e-6,
                                  rtol=1e-6)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    zs = layer(x)
    assert [z.shape for z in zs] == [(3, 4, 8, 8), (3, 8, 4, 4)]
    for fz, z in zip(cell(zs, x), zs, strict=True):
        assert float((fz - z).abs().max()) < 1e-4
    sum(z.sum() for z in zs).backward()
    assert layer.stats.backward is not None and layer.stats.backward.all_converged
    assert all(p.grad is not None for p in cell.parameters())


# -- layers: errors, convergence, housekeeping -----------------------------------------------


class WrongOutput(nn.Module):
    """An ``f`` returning ``mode``-specific wrong results."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, zs: tuple[Tensor, ...], x: Tensor) -> object:
        if self.mode == "tensor":
            return zs[0]
        if self.mode == "count":
            return zs[:1]
        return zs[0], zs[1][:, :1]


def test_layer_errors() -> None:
    x = x_batch()
    with pytest.raises(TypeError, match=r"f\(zs, x\) must be a tuple of tensors"):
        contdeq.MultiScaleDEQ(WrongOutput("tensor"), state_shapes=SHAPES)(x)
    with pytest.raises(ValueError, match=r"f\(zs, x\) must have 2 tensors"):
        contdeq.MultiScaleDEQ(WrongOutput("count"), state_shapes=SHAPES)(x)
    with pytest.raises(ValueError, match=r"f\(zs, x\)\[1\] \(scale 1\) must have shape "
                                         r"\(2, 2, 2, 2\)"):
        contdeq.MultiScaleSkipRegDEQ(WrongOutput("shape"), state_shapes=SHAPES)(x)
    with pytest.raises(RuntimeError, match=r"f\(zs, x\) failed with per-scale states"):
        contdeq.MultiScaleDEQ(TinyCell(), state_shapes=[(3, 4, 4), (2, 2, 2)])(x)
    with pytest.raises(TypeError, match="not state_shape"):
        contdeq.MultiScaleDEQ(TinyCell(), state_shapes=SHAPES, state_shape=(4,))
    with pytest.raises(ValueError, match="state_shapes must be a non-empty sequence"):
        contdeq.MultiScaleDEQ(TinyCell(), state_shapes=[])
    with pytest.raises(TypeError, match=r"f must be an nn\.Module called as f\(zs, x\)"):
        contdeq.MultiScaleDEQ(lambda zs, x: zs, state_shapes=SHAPES)  # type: ignore[arg-type]
    layer = make_layer("DEQ")
    with pytest.raises(ValueError, match=r"z0\[0\] \(scale 0\) must have shape \(2, 2, 4, 4\)"):
        layer(x, z0=(torch.zeros(2, 2, 2, 2), torch.zeros(2, 2, 2, 2)))
    with pytest.raises(ValueError, match="z0 must have x's batch size"):
        layer(x, z0=(torch.zeros(3, *SHAPES[0]), torch.zeros(3, *SHAPES[1])))


class LateWrongOutput(nn.Module):
    """Correct on its first call, then returns the scales in the wrong shape."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, zs: tuple[Tensor, ...], x: Tensor) -> tuple[Tensor, ...]:
        self.calls += 1
        z0, z1 = (0.5 * z + 1.0 for z in zs)
        return (z0, z1) if self.calls == 1 else (z0, z1.reshape(len(z1), 1, -1))


def test_checked_layout_is_trusted_only_while_it_holds() -> None:
    """After its first call the adapter skips the per-scale checks, but an output whose layout
    changes later still gets the per-scale error (not a silent reshape)."""
    layer = contdeq.MultiScaleDEQ(LateWrongOutput(), state_shapes=SHAPES, solver="picard")
    with pytest.raises(ValueError, match=r"f\(zs, x\)\[1\] \(scale 1\) must have shape"):
        layer(x_batch())
    assert layer.f.f.calls == 2


class BadPredictor(nn.Module):
    def __init__(self, out: object) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: Tensor) -> object:
        return self.out


def test_predictor_errors() -> None:
    x = x_batch()
    good = TinyPredictor()(x)
    cases = [
        (good[0], TypeError, r"predictor\(x\) must be a tuple of tensors"),
        (good[:1], ValueError, r"predictor\(x\) must have 2 tensors"),
        ((good[0], good[1][:, :1]), ValueError,
         r"predictor\(x\)\[1\] \(scale 1\) must have shape \(2, 2, 2, 2\)"),
        ((good[0][:1], good[1][:1]), ValueError, r"predictor\(x\) must have x's batch size"),
        ((good[0].float(), good[1].float()), TypeError, r"predictor\(x\) must have x's dtype"),
    ]
    for out, error, message in cases:
        layer = contdeq.MultiScaleSkipDEQ(TinyCell(), BadPredictor(out), state_shapes=SHAPES)
        with pytest.raises(error, match=message):
            layer(x)


class SlowCoarseScale(nn.Module):
    """Scale 0 is at its fixed point ``x`` after one step; scale 1 contracts at the rate
    ``x[b, 0, 0, 0]`` per step: slowly for a sample with rate 0.95."""

    def forward(self, zs: tuple[Tensor, ...], x: Tensor) -> tuple[Tensor, Tensor]:
        rate = x[:, :1, :1, :1]
        return x.expand_as(zs[0]).clone(), rate * zs[1] + 1.0


def test_convergence_is_over_all_scales_together() -> None:
    x = torch.full((2, 1, 4, 4), 0.05, dtype=torch.float64)
    x[0] = 0.95
    layer = contdeq.MultiScaleDEQ(SlowCoarseScale(), state_shapes=[(1, 4, 4), (1, 2, 2)],
                                  solver="picard", max_steps=8, atol=1e-6, rtol=0.0,
                                  on_nonconvergence="ignore")
    zs = layer(x)
    assert layer.stats.forward.converged.tolist() == [False, True]
    fine, coarse = (fz - z for fz, z in zip(layer.f.f(zs, x), zs, strict=True))
    assert float(fine[0].abs().max()) == 0.0  # the fine scale of sample 0 is at its fixed point
    assert float(coarse[0].abs().max()) > 1e-3  # its coarse scale keeps the sample unconverged
    with pytest.warns(contdeq.solvers.ConvergenceWarning):
        contdeq.MultiScaleDEQ(SlowCoarseScale(), state_shapes=[(1, 4, 4), (1, 2, 2)],
                              solver="picard", max_steps=8, atol=1e-6, rtol=0.0)(x)


def test_aux_terms_and_jacobian() -> None:
    x = x_batch(3)
    for kind in ("SkipDEQ", "SkipRegDEQ"):
        layer = make_layer(kind, atol=1e-6, rtol=1e-6)
        layer(x)
        assert set(layer.aux_terms) == {"skip"} and contdeq.aux_loss(layer).item() > 0
    layer = make_layer("DEQ", jacobian_weight=0.5, atol=1e-6, rtol=1e-6)
    layer(x)
    term = layer.aux_terms["jacobian"]
    term.backward()
    assert term.item() > 0 and layer.f.f.a.weight.grad is not None


def test_state_dict_repr_deepcopy_and_normalization() -> None:
    torch.manual_seed(0)
    cell = contdeq.MultiScaleCell([4, 8], 4, normalization="spectral")
    layer = contdeq.MultiScaleDEQ(cell, state_shapes=cell.state_shapes(8, 8), atol=1e-4,
                                  rtol=1e-4)
    keys = list(layer.state_dict())
    assert keys and all(k.startswith("f.f.") for k in keys)
    assert any("parametrizations.weight.original" in k for k in keys)
    text = repr(layer)
    assert "MultiScaleDEQ(" in text and "state_shapes=((4, 8, 8), (8, 4, 4))" in text
    assert "state_shape=(" not in text
    assert contdeq.update_normalization(layer) == 8  # every conv acting on the state
    x = torch.randn(2, 4, 8, 8)
    layer.eval()
    with torch.no_grad():
        expected = layer(x)
    clone = contdeq.MultiScaleDEQ(contdeq.MultiScaleCell([4, 8], 4, normalization="spectral"),
                                  state_shapes=cell.state_shapes(8, 8), atol=1e-4, rtol=1e-4)
    clone.load_state_dict(layer.state_dict())
    clone.eval()
    for other in (clone, copy.deepcopy(layer)):
        with torch.no_grad():
            for a, b in zip(other(x), expected, strict=True):
                torch.testing.assert_close(a, b)


def test_neural_ode() -> None:
    x = x_batch(3).requires_grad_()
    node = contdeq.MultiScaleNeuralODE(TinyCell(), t_end=40.0, state_shapes=SHAPES, rtol=1e-9,
                                       atol=1e-9)
    zs = node(x)
    assert [tuple(z.shape) for z in zs] == [(3, *s) for s in SHAPES]
    sum(z.sum() for z in zs).backward()
    assert x.grad is not None and node.f.f.a.weight.grad is not None
    assert node.stats.forward.nfe > 0 and "t_end=40" in repr(node)
    deq = make_layer("DEQ")
    deq.load_state_dict(node.state_dict())
    for a, b in zip(node(x), deq(x), strict=True):  # long integration reaches the equilibrium
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    z0 = tuple(torch.ones(3, *s, dtype=torch.float64) for s in SHAPES)
    short = contdeq.MultiScaleNeuralODE(TinyCell(), t_end=1e-3, state_shapes=SHAPES)
    assert float((short(x, z0=z0)[1] - 1).abs().max()) < 0.01


def test_training_reduces_loss() -> None:
    torch.manual_seed(0)
    x, y = contdeq.procedural_images(64, size=8, classes=2, seed=0)
    cell = contdeq.MultiScaleCell([4, 8], 4, normalization="spectral")
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        contdeq.MultiScaleSkipRegDEQ(cell, state_shapes=cell.state_shapes(8, 8), atol=1e-3,
                                     rtol=1e-3),
    )
    head = nn.Linear(12, 2)

    def loss_fn() -> Tensor:
        zs = model(x)
        return F.cross_entropy(head(torch.cat([z.amax(dim=(2, 3)) for z in zs], 1)), y)

    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-2)
    with torch.no_grad():
        before = loss_fn().item()
    for _ in range(15):
        loss = loss_fn() + contdeq.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = loss_fn().item()
    assert after < 0.7 * before  # 0.36-0.51 x measured over seeds


# -- blocks ----------------------------------------------------------------------------------


def test_residual_block() -> None:
    block = contdeq.ResidualBlock(4, hidden=8, groups=2)
    z, inj = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    assert block(z).shape == (2, 4, 6, 6) and block(z, inj).shape == (2, 4, 6, 6)
    assert not torch.equal(block(z), block(z, inj))
    torch.testing.assert_close(block(z[:1]), block(z)[:1])  # per sample: no batch statistics
    with pytest.raises(ValueError, match="groups=3 must divide channels=4"):
        contdeq.ResidualBlock(4, groups=3)
    with pytest.raises(ValueError, match="norm_eps must be a finite float > 0"):
        contdeq.ResidualBlock(4, groups=2, norm_eps=0.0)


def test_fusion_three_scales() -> None:
    fusion = contdeq.MultiScaleFusion([2, 4, 8], groups=2)
    zs = (torch.randn(2, 2, 8, 8), torch.randn(2, 4, 4, 4), torch.randn(2, 8, 2, 2))
    out = fusion(zs)
    assert [o.shape for o in out] == [z.shape for z in zs]
    strided = [[sum(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in t.modules())
                for t in row] for row in fusion.transforms]
    assert strided == [[0, 0, 0], [1, 0, 0], [2, 1, 0]]  # i - j stride-2 convs from finer j
    only_fine = (zs[0], torch.zeros_like(zs[1]), torch.zeros_like(zs[2]))
    out = fusion(only_fine)
    torch.testing.assert_close(out[0], zs[0])  # identity path; zeros contribute nothing
    assert all(float(o.abs().max()) > 0 for o in out[1:])
    with pytest.raises(ValueError, match=r"zs\[2\] \(scale 2\) must have shape \(B, 8, H/4"):
        fusion((zs[0], zs[1], torch.randn(2, 8, 4, 4)))
    with pytest.raises(ValueError, match="zs must have 3 tensors"):
        fusion(zs[:2])


def test_multiscale_cell_three_scales_and_options() -> None:
    cell = contdeq.MultiScaleCell([2, 4, 8], 3, groups=2)
    shapes = cell.state_shapes(8, 8)
    assert shapes == ((2, 8, 8), (4, 4, 4), (8, 2, 2))
    zs = tuple(torch.randn(2, *s) for s in shapes)
    assert [o.shape for o in cell(zs, torch.randn(2, 3, 8, 8))] == [z.shape for z in zs]
    with pytest.raises(ValueError, match="x must have the finest scale's resolution"):
        cell(zs, torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="divisible by 4"):
        cell.state_shapes(6, 8)
    with pytest.raises(ValueError, match="normalization must be one of"):
        contdeq.MultiScaleCell([2, 4], 3, groups=2, normalization="batch")
    weight = contdeq.MultiScaleCell([2, 4], 3, groups=2, normalization="weight")
    parametrized = [m for m in weight.modules() if hasattr(m, "parametrizations")]
    assert len(parametrized) == 8 and not hasattr(weight.injection[0], "parametrizations")
    spectral = contdeq.MultiScaleCell([2, 4], 3, groups=2, normalization="spectral", cap=0.6)
    caps = sorted({round(m.cap, 6) for m in spectral.modules()
                   if isinstance(m, contdeq.SpectralNormCap)})
    assert caps == [0.2, 0.6]  # 3x3 kernels: 0.6 / 3; 1x1 kernels: 0.6


# -- procedural images -----------------------------------------------------------------------


def test_procedural_images() -> None:
    start = time.perf_counter()
    x, y = contdeq.procedural_images(4000, size=16, seed=3)
    assert time.perf_counter() - start < 3.0  # ~0.2 s measured; slack for a busy machine
    assert x.shape == (4000, 1, 16, 16) and x.dtype == torch.float32
    assert y.shape == (4000,) and y.dtype == torch.int64
    assert y.bincount().tolist() == [500] * 8
    x2, y2 = contdeq.procedural_images(4000, size=16, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = contdeq.procedural_images(4000, size=16, seed=4)
    assert not torch.equal(x, x3)
    xc, yc = contdeq.procedural_images(10, size=12, classes=3, channels=3, seed=0)
    assert xc.shape == (10, 3, 12, 12) and sorted(yc.bincount().tolist()) == [3, 3, 4]
    for k in range(8):  # each class draws a visible foreground over the background
        assert float(x[y == k].std()) > 0.2
    with pytest.raises(ValueError, match="classes must be an int from 2 to 8"):
        contdeq.procedural_images(10, classes=9)
    with pytest.raises(ValueError, match="size must be an int >= 8"):
        contdeq.procedural_images(10, size=4)
