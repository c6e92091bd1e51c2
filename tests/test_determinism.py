"""Determinism (seeds + deterministic algorithms: identical reruns), and compiled ``f``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import contdeq

from .layer_models import TanhCell

KINDS = ("DEQ", "DEQ-anderson-jacobian", "SkipDEQ", "SkipRegDEQ", "NeuralODE")


@pytest.fixture
def deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def make_model(kind: str) -> nn.Module:
    cell = TanhCell(6, 6, dtype=torch.float32, cap=0.9)
    options = {"atol": 1e-4, "rtol": 1e-4}
    if kind == "DEQ":
        layer: nn.Module = contdeq.DEQ(cell, **options)
    elif kind == "DEQ-anderson-jacobian":  # the Jacobian regularizer draws random probes
        layer = contdeq.DEQ(cell, solver="anderson", jacobian_weight=0.1, **options)
    elif kind == "SkipDEQ":
        layer = contdeq.SkipDEQ(cell, nn.Linear(6, 6), **options)
    elif kind == "SkipRegDEQ":
        layer = contdeq.SkipRegDEQ(cell, **options)
    else:
        layer = contdeq.NeuralODE(cell)
    return nn.Sequential(nn.Linear(4, 6), layer, nn.Dropout(0.2), nn.Linear(6, 3))


def train(kind: str, seed: int, steps: int = 4) -> list[torch.Tensor]:
    """A few Adam steps on random data (dropout and probes use the global RNG)."""
    torch.manual_seed(seed)
    model = make_model(kind)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x, y = torch.randn(16, 4), torch.randint(3, (16,))
        loss = nn.functional.cross_entropy(model(x), y) + contdeq.aux_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_runs_are_identical(kind: str, deterministic: None) -> None:
    first, second = train(kind, seed=7), train(kind, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    other = train(kind, seed=8)  # and the comparison can fail
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_compiled_f_gives_the_same_equilibrium_and_gradients() -> None:
    """``torch.compile(f)`` as the layer's ``f``: forward (solver loop, no grad) and the
    implicit backward (``functional_call`` of ``f``) both run the compiled module."""
    torch.manual_seed(0)
    cell = TanhCell(3, 2)
    x = torch.randn(4, 2, dtype=torch.float64)
    eager = contdeq.DEQ(cell, state_shape=3)
    compiled = contdeq.DEQ(torch.compile(cell, backend="eager"), state_shape=3)
    results = []
    for layer in (eager, compiled):
        cell.zero_grad()
        layer(x).square().sum().backward()
        results.append((layer.stats.forward.nfe, [p.grad.clone() for p in cell.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


def test_scripted_f_runs_inference() -> None:
    """A TorchScript ``f`` works without grad; training needs an eager or compiled ``f``."""
    torch.manual_seed(0)
    cell = TanhCell(3, 2)
    x = torch.randn(4, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(cell)
    with torch.no_grad():
        expected = contdeq.DEQ(cell, state_shape=3)(x)
        got = contdeq.DEQ(scripted, state_shape=3)(x)
    assert torch.equal(got, expected)
