"""What the default skip term (``skip_detach=True``) trains, as docs/layers.md states it:
SkipRegDEQ's term trains f and an upstream encoder; SkipDEQ's trains the predictor and the
encoder; neither sends gradient through z*."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import contdeq
from tests.layer_models import TanhCell

D = 4
F64 = torch.float64


def skip_grads(kind: str, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradients of the skip term alone (``contdeq.aux_loss``) of a random encoder + skip
    layer, by parameter name, and the term's value recomputed by hand with ``z*`` detached."""
    torch.manual_seed(seed)
    encoder = nn.Linear(3, D, dtype=F64)
    f = TanhCell(D, D, lipschitz=0.7)
    if kind == "skipreg":
        layer: nn.Module = contdeq.SkipRegDEQ(f, solver="anderson", atol=1e-10, rtol=1e-10)
    else:
        layer = contdeq.SkipDEQ(f, nn.Linear(D, D, dtype=F64), solver="anderson", atol=1e-10,
                                rtol=1e-10)
    model = nn.Sequential(encoder, layer).train()
    x = torch.randn(16, 3, dtype=F64)
    z = model(x)
    term = contdeq.aux_loss(model)
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(term, list(named.values()), allow_unused=True)
    u = encoder(x)
    guess = f(torch.zeros_like(u), u) if kind == "skipreg" else layer.predictor(u)
    by_hand = ((guess - z.detach()) ** 2).mean()
    return {n: (torch.zeros_like(p) if g is None else g)
            for (n, p), g in zip(named.items(), grads, strict=True)}, term - by_hand


@pytest.mark.parametrize("seed", range(5))
def test_skipreg_term_trains_f_and_the_encoder(seed: int) -> None:
    """SkipRegDEQ: the default skip term has nonzero gradients for f's parameters and the
    encoder's: catches the claim that it "never changes what the model computes"."""
    grads, diff = skip_grads("skipreg", seed)
    assert abs(float(diff)) < 1e-12  # the term is lambda * mean((f(0, x) - sg(z*))^2)
    assert float(grads["1.f.U.weight"].abs().max()) > 1e-6
    assert float(grads["0.weight"].abs().max()) > 1e-6


@pytest.mark.parametrize("seed", range(5))
def test_skip_term_trains_the_predictor_and_the_encoder_not_f(seed: int) -> None:
    """SkipDEQ: the default skip term trains the predictor and the encoder, and f gets
    exactly zero gradient (no path through z*)."""
    grads, diff = skip_grads("skip", seed)
    assert abs(float(diff)) < 1e-12
    assert float(grads["1.predictor.weight"].abs().max()) > 1e-6
    assert float(grads["0.weight"].abs().max()) > 1e-6
    for name in ("1.f.W.weight", "1.f.U.weight", "1.f.U.bias"):
        assert float(grads[name].abs().max()) == 0.0


def test_undetached_term_of_a_frozen_predictor_trains_f() -> None:
    """``skip_detach=False`` with a frozen predictor (no graph in ``predictor(x)``): the term
    is still there and trains f through z*. Catches the term dropped because the prediction
    carries no gradient of its own."""
    torch.manual_seed(0)
    f = TanhCell(D, D, lipschitz=0.7)
    predictor = nn.Linear(D, D, dtype=F64).requires_grad_(False)
    layer = contdeq.SkipDEQ(f, predictor, skip_detach=False, solver="anderson", atol=1e-10,
                            rtol=1e-10)
    x = torch.randn(8, D, dtype=F64)
    z = layer(x)
    assert set(layer.aux_terms) == {"skip"}
    torch.testing.assert_close(contdeq.aux_loss(layer), ((predictor(x) - z) ** 2).mean())
    (grad,) = torch.autograd.grad(contdeq.aux_loss(layer), f.U.weight)
    assert float(grad.abs().max()) > 1e-6
