"""Weight-tied unrolled layers (``contdeq.WeightTied``, ``MultiScaleWeightTied``): against
hand-written unrolled references, float64 gradchecks, the masks (seeded, distinct, exact
sparsity, saved in the ``state_dict``), stats and argument errors; the benchmark rows."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

import contdeq
from contdeq.solvers import NonFiniteError

ROOT = Path(__file__).resolve().parents[1]


class LinearCell(nn.Module):
    """``f(z, x) = tanh(W z + b + x)``."""

    def __init__(self, width: int = 5, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width, dtype=dtype)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.linear(z) + x)


class ConvCell(nn.Module):
    """``f(z, x) = tanh(conv(z) + x)`` with a spectral cap on the kernel (a parametrized
    weight: the masks must apply to the capped weight)."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.conv = contdeq.spectral_norm_cap(
            nn.Conv2d(channels, channels, 3, padding=1, dtype=torch.float64), cap=0.3)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.conv(z) + x)


class TwoScaleCell(nn.Module):
    """``f((z0, z1), x) = (tanh(A z0 + up(z1) + x), tanh(B z1 + pool(z0)))``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1, dtype=torch.float64)
        self.b = nn.Linear(2, 2, dtype=torch.float64)  # on the channel axis, moved last

    def forward(self, zs: tuple[Tensor, ...], x: Tensor) -> tuple[Tensor, Tensor]:
        z0, z1 = zs
        up = F.interpolate(z1, scale_factor=2, mode="nearest")
        coarse = self.b(z1.movedim(1, -1)).movedim(-1, 1) + F.avg_pool2d(z0, 2)
        return torch.tanh(self.a(z0) + up + x), torch.tanh(coarse)


def _unrolled(cell: LinearCell | ConvCell, x: Tensor, masks: Tensor | None, depth: int
              ) -> Tensor:
    """The reference: ``depth`` explicit applications, masks applied by hand."""
    module = cell.linear if isinstance(cell, LinearCell) else cell.conv
    z = torch.zeros_like(x)
    for k in range(depth):
        w = module.weight if masks is None else module.weight * masks[k]
        out = (F.linear(z, w, module.bias) if isinstance(cell, LinearCell)
               else F.conv2d(z, w, module.bias, padding=1))
        z = torch.tanh(out + x)
    return z


@pytest.mark.parametrize("masks", [None, "distinct"])
def test_gradcheck_input_and_weight(masks: str | None) -> None:
    """Float64 gradcheck w.r.t. ``x``, ``z0`` and the weight, with and without masks: catches a
    wrong or missing gradient path through the masked applications (e.g. a mask applied to a
    detached weight, or ``z0`` cut from the graph)."""
    torch.manual_seed(0)
    layer = contdeq.WeightTied(LinearCell(4), 3, masks=masks, sparsity=0.5 if masks else 0.0)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    z0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    w = layer.f.linear.weight.detach().clone().requires_grad_()

    def fn(x: Tensor, z0: Tensor, w: Tensor) -> Tensor:
        return functional_call(layer, {"f.linear.weight": w}, (x, z0))

    assert torch.autograd.gradcheck(fn, (x, z0, w))


@pytest.mark.parametrize("cell_kind", ["linear", "conv"])
def test_output_and_gradient_equal_hand_unrolled(cell_kind: str) -> None:
    """Depth-k output and weight gradient equal k explicit applications of f with the layer's
    masks multiplied in by hand (the conv's weight is spectrally capped: the mask must apply to
    the capped weight). Catches a wrong mask per iteration (e.g. always mask 0), an off-by-one
    depth, or masks applied to the raw instead of the effective weight."""
    torch.manual_seed(1)
    depth = 4
    if cell_kind == "linear":
        cell, x = LinearCell(6), torch.randn(3, 6, dtype=torch.float64)
    else:
        cell, x = ConvCell(2), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    layer = contdeq.WeightTied(cell, depth, masks="distinct", sparsity=0.5, seed=3)
    layer.eval()
    z = layer(x)
    (grad,) = torch.autograd.grad(z.square().sum(), list(cell.parameters())[:1])
    masks = next(layer.masks.buffers())
    ref = _unrolled(cell, x, masks, depth)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), list(cell.parameters())[:1])
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    unmasked = _unrolled(cell, x, None, depth)
    assert (z - unmasked).abs().max() > 1e-3  # the masks matter here
    plain = contdeq.WeightTied(cell, depth)
    torch.testing.assert_close(plain(x), unmasked, rtol=0, atol=1e-12)


def test_masks_seeded_distinct_and_at_the_stated_sparsity() -> None:
    """Same seed -> the same masks, another seed -> others; every application's mask differs
    from every other's; each zeroes exactly round(sparsity * n) entries. Catches masks drawn
    from the global RNG, one mask reused for every iteration, or a Bernoulli (inexact) count."""
    torch.manual_seed(0)
    cell = ConvCell(3)  # 81 weights
    a = contdeq.WeightTied(cell, 6, masks="distinct", sparsity=0.8, seed=7)
    torch.manual_seed(123)
    b = contdeq.WeightTied(cell, 6, masks="distinct", sparsity=0.8, seed=7)
    c = contdeq.WeightTied(cell, 6, masks="distinct", sparsity=0.8, seed=8)
    ma, mb, mc = (next(m.masks.buffers()) for m in (a, b, c))
    assert ma.dtype == torch.bool and ma.shape == (6, 3, 3, 3, 3)
    assert torch.equal(ma, mb)
    assert not torch.equal(ma, mc)
    flat = ma.reshape(6, -1)
    for i in range(6):
        assert int((~flat[i]).sum()) == round(0.8 * 81)
        for j in range(i):
            assert not torch.equal(flat[i], flat[j])
    assert a.masked_weights == ("conv.weight",)
    assert a.active_parameters() == pytest.approx(81 + 3 - round(0.8 * 81))


def test_shared_mask_is_one_mask_at_the_stated_sparsity_applied_every_time() -> None:
    """``masks="shared"``: every application uses the same mask (exact sparsity, seeded), and
    the output equals the hand-unrolled cell with that one mask. Catches a shared mask that
    differs between applications or is never applied."""
    torch.manual_seed(0)
    cell = LinearCell(6)
    layer = contdeq.WeightTied(cell, 5, masks="shared", sparsity=0.5, seed=2)
    mask = next(layer.masks.buffers())
    assert mask.shape == (5, 6, 6)
    for k in range(1, 5):
        assert torch.equal(mask[k], mask[0])
    assert int((~mask[0]).sum()) == 18
    other = contdeq.WeightTied(cell, 5, masks="shared", sparsity=0.5, seed=3)
    assert not torch.equal(next(other.masks.buffers())[0], mask[0])
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _unrolled(cell, x, mask, 5), rtol=0, atol=1e-12)
    assert (layer(x) - _unrolled(cell, x, None, 5)).abs().max() > 1e-3
    assert layer.active_parameters() == pytest.approx(36 + 6 - 18)


def test_state_dict_round_trip_restores_masks() -> None:
    """A fresh model with another seed (other weights, other masks) loaded from a state_dict
    gives the saved model's masks and outputs. Catches masks kept outside the state_dict (they
    would stay those of the fresh model's seed)."""
    torch.manual_seed(0)
    saved = contdeq.WeightTied(LinearCell(5), 3, masks="distinct", sparsity=0.5, seed=0)
    torch.manual_seed(1)
    fresh = contdeq.WeightTied(LinearCell(5), 3, masks="distinct", sparsity=0.5, seed=1)
    x = torch.randn(4, 5, dtype=torch.float64)
    assert "masks.linear_weight" in saved.state_dict()
    assert not torch.allclose(saved(x), fresh(x))
    fresh.load_state_dict(saved.state_dict())
    assert torch.equal(fresh.masks.linear_weight, saved.masks.linear_weight)
    torch.testing.assert_close(fresh(x), saved(x), rtol=0, atol=0)
    clone = copy.deepcopy(saved)
    torch.testing.assert_close(clone(x), saved(x), rtol=0, atol=0)


def test_stats_count_every_call_and_report_the_last_update() -> None:
    """stats: nfe = steps = depth = the f calls counted by a wrapper; residual = rms of the last
    update, per sample. Catches a miscount (e.g. the first call counted twice) or a residual
    of the wrong iterates."""
    torch.manual_seed(0)
    cell = LinearCell(4)
    calls = []
    cell.register_forward_hook(lambda m, args, out: calls.append(args[0].detach().clone()))
    layer = contdeq.WeightTied(cell, 5)
    x = torch.randn(3, 4, dtype=torch.float64)
    z = layer(x)
    stats = layer.stats.forward
    assert len(calls) == stats.nfe == stats.steps == 5
    assert stats.stop_reason == "depth" and stats.all_converged
    expected = (z - calls[-1]).square().mean(dim=1).sqrt()
    torch.testing.assert_close(stats.residual, expected)
    assert layer.stats.backward is None


def test_multiscale_matches_explicit_applications() -> None:
    """MultiScaleWeightTied returns the tuple of ``depth`` explicit applications of a 2-scale
    f (from zeros and from a given tuple z0); with masks, every Linear/Conv of f is masked and
    the masks change the output. Catches a broken reuse of the multi-scale adapter (scales
    mixed up, z0 ignored) or weights of the inner f missed by the masks."""
    torch.manual_seed(0)
    cell, shapes = TwoScaleCell(), ((2, 4, 4), (2, 2, 2))
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    z0 = (torch.randn(3, *shapes[0], dtype=torch.float64),
          torch.randn(3, *shapes[1], dtype=torch.float64))
    layer = contdeq.MultiScaleWeightTied(cell, 3, state_shapes=shapes)
    for start in (None, z0):
        zs = tuple(torch.zeros(3, *s, dtype=torch.float64) for s in shapes) if start is None \
            else start
        for _ in range(3):
            zs = cell(zs, x)
        out = layer(x, start)
        assert len(out) == 2
        for got, ref in zip(out, zs, strict=True):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    masked = contdeq.MultiScaleWeightTied(cell, 3, state_shapes=shapes, masks="distinct",
                                          sparsity=0.5)
    assert masked.masked_weights == ("f.a.weight", "f.b.weight")
    assert set(masked.state_dict()) >= {"masks.f_a_weight", "masks.f_b_weight"}
    assert (masked(x)[0] - layer(x)[0]).abs().max() > 1e-3
    assert masked.stats.forward.nfe == 3


def test_forward_of_masked_modules_restored_after_an_error() -> None:
    """When f raises mid-unroll, its modules compute with their own weights again afterwards.
    Catches a masked weight left in place (later plain calls of f would silently use it)."""
    torch.manual_seed(0)

    class Failing(LinearCell):
        calls = 0

        def forward(self, z: Tensor, x: Tensor) -> Tensor:
            Failing.calls += 1
            if Failing.calls == 2:
                raise RuntimeError("boom")
            return super().forward(z, x)

    cell = Failing(3)
    layer = contdeq.WeightTied(cell, 3, masks="distinct", sparsity=0.5)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="boom"):
        layer(x)
    assert "forward" not in vars(cell.linear)
    torch.testing.assert_close(cell.linear(x), F.linear(x, cell.linear.weight, cell.linear.bias))


def test_nonfinite_state_raises() -> None:
    """A diverging unroll raises NonFiniteError naming the depth instead of returning NaN."""
    cell = LinearCell(2)
    with torch.no_grad():
        cell.linear.weight.fill_(math.inf)
    with pytest.raises(NonFiniteError, match="after 2 applications"):
        contdeq.WeightTied(cell, 2)(torch.ones(1, 2, dtype=torch.float64))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"depth": 0}, ValueError, "depth must be an int >= 1"),
    ({"depth": 2.0}, ValueError, "depth must be an int >= 1"),
    ({"depth": 2, "masks": "distict", "sparsity": 0.5}, ValueError,
     "masks must be None, 'distinct' or 'shared'"),
    ({"depth": 2, "masks": "distinct", "sparsity": 1.0}, ValueError, r"sparsity .* \[0, 1\)"),
    ({"depth": 2, "masks": "distinct", "sparsity": -0.1}, ValueError, r"sparsity .* \[0, 1\)"),
    ({"depth": 2, "masks": "distinct", "sparsity": "0.5"}, ValueError, r"sparsity .* \[0, 1\)"),
    ({"depth": 2, "sparsity": 0.5}, ValueError, "needs masks='distinct'"),
    ({"depth": 2, "masks": "distinct"}, ValueError, "needs sparsity > 0"),
    ({"depth": 2, "seed": -1}, ValueError, "seed must be an int >= 0"),
    ({"depth": 2, "state_shape": (0,)}, ValueError, "state_shape must be"),
])
def test_bad_arguments_name_the_argument(kwargs: dict, error: type, match: str) -> None:
    """Each invalid constructor argument raises an error naming it and what was expected."""
    with pytest.raises(error, match=match):
        contdeq.WeightTied(LinearCell(2), **kwargs)


def test_bad_cell_and_inputs() -> None:
    """f that is not a module, masks on an f without Linear/Conv, a non-float x and a wrongly
    shaped z0 are reported with the argument's name."""
    with pytest.raises(TypeError, match=r"f must be an nn\.Module"):
        contdeq.WeightTied(lambda z, x: z, 2)  # type: ignore[arg-type]
    class NoWeights(nn.Module):
        def forward(self, z: Tensor, x: Tensor) -> Tensor:
            return torch.tanh(z + x)

    with pytest.raises(ValueError, match="no weight to mask"):
        contdeq.WeightTied(NoWeights(), 2, masks="distinct", sparsity=0.5)

    class Colliding(nn.Module):  # a_b.weight and a.b.weight both map to the name a_b_weight
        def __init__(self) -> None:
            super().__init__()
            self.a_b, self.c, self.a = nn.Linear(2, 2), nn.Linear(2, 2), nn.Module()
            self.a.b = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"f's weights 'a\.b\.weight' and 'a_b\.weight' map "
                                         r"to the same mask name 'a_b_weight'"):
        contdeq.WeightTied(Colliding(), 2, masks="distinct", sparsity=0.5)
    layer = contdeq.WeightTied(LinearCell(2), 2)
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        layer(torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="z0 must have x's batch size"):
        layer(torch.ones(2, 2, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64))


def test_benchmark_rows_build_the_named_layers() -> None:
    """Every weight-tied row of the paper benchmark builds a layer of the depth and sparsity its
    name states (``MS`` rows: the multi-scale layer), and the rows stay out of paper.py's
    default run. Catches a registry typo (e.g. depth 8 built as 4, masks dropped)."""
    from benchmarks import common

    names = common.WEIGHT_TIED_MODELS
    assert len(names) == 18
    for name in names:
        ms = name.startswith("MS ")
        if ms:
            layer = common.MULTISCALE_MODELS[name](TwoScaleCell(), None,
                                                         ((2, 4, 4), (2, 2, 2)))
        else:
            layer = common.MODELS[name](LinearCell(3), None)
        assert isinstance(layer, contdeq.MultiScaleWeightTied if ms else contdeq.WeightTied)
        depth = int(name.split("(")[1].split(")")[0])
        sparsity = float(name.split("masks ")[1]) if "masks" in name else 0.0
        assert layer.depth == depth and layer.sparsity == sparsity
        assert (layer.mask_kind == "distinct") == (sparsity > 0)
        assert name in common.OPTIONAL_MODELS


@pytest.mark.slow
def test_weight_tied_benchmark_smoke(tmp_path: Path) -> None:
    """The benchmark entry point runs its smoke preset and writes the table, JSON and the
    three figures, with a row per model and the measured mask cost."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from benchmarks import weight_tied

    result = weight_tied.main(["--smoke", "--tasks", "spirals", "--mask-repeats", "1",
                               "--out", str(tmp_path)])
    md = (tmp_path / "weight_tied_smoke.md").read_text()
    for kind in ("depth", "sparsity", "target"):
        assert (tmp_path / f"weight_tied_smoke_{kind}.png").stat().st_size > 0
    assert [r["model"] for r in result["rows"]] == [
        m for m in weight_tied.MODELS if not m.startswith("MS ")]
    assert "| WeightTied(16) masks 0.8 |" in md
    assert {c["variant"] for c in result["mask_cost"]} == {
        "no masks", "masked weights materialized (dense)", "sparse kernels (never materialized)"}


@pytest.mark.slow
def test_masks_study_smoke(tmp_path: Path) -> None:
    """The masks study runs its smoke preset: every row and seed trained, the equal-active row
    within 5% of the dense row's active entries of f, the masked rows at half the entries, and
    the table written with the paired comparisons."""
    pytest.importorskip("sklearn")
    from benchmarks import weight_tied

    records = weight_tied.main(["--smoke", "--masks-study", "--out", str(tmp_path)])[
        "masks_study"]
    assert len(records) == 2 * len(weight_tied.STUDY_ROWS)
    active = {r["row"]: r["f_active"] for r in records}
    assert abs(active["distinct masks, wider"] / active["dense"] - 1) < 0.05
    assert active["shared mask"] == active["distinct masks"] < 0.51 * active["dense"]
    md = (tmp_path / "weight_tied_masks_smoke.md").read_text()
    assert "| distinct masks − shared mask |" in md
