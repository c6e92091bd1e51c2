"""The friction points of a researcher's first hour (issue 30), one test each: warnings at the
user's line, errors that name the argument and the fix, short stats, quiet documented paths,
the demo's timing, a quick checkpoint, the hint when a layer's solves keep failing."""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import contdeq
from contdeq.nn.deq import HINT_AFTER
from contdeq.solvers import ConvergenceWarning, steady_state

ROOT = Path(__file__).resolve().parents[1]


class Cell(nn.Module):
    """``tanh(W z + x)`` with ``||W||_2 <= 0.9``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.linear = contdeq.spectral_norm_cap(nn.Linear(width, width), cap=0.9)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z) + x)


class Expanding(nn.Module):
    """``3 tanh(5 W z) + x``: no contraction, so solves with few steps stop unconverged."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 3 * torch.tanh(5 * self.linear(z)) + x


def _caught(run: object) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()  # type: ignore[operator]
    return caught


def test_warnings_point_at_the_users_line() -> None:
    """ConvergenceWarning (from steady_state, a layer's forward and its backward) and the
    unstable-normalization warning name this file, not contdeq's or torch's."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)

    def direct() -> None:
        steady_state(lambda t, z: torch.ones_like(z), torch.zeros(2, 3), max_steps=3)

    def layer_forward_and_backward() -> None:
        layer = contdeq.DEQ(Expanding(), max_steps=3, backward_max_steps=1)
        layer(x).sum().backward()

    def spectral() -> None:
        cell = Expanding()
        nn.utils.parametrizations.spectral_norm(cell.linear)
        contdeq.DEQ(cell)

    for run, at_least in ((direct, 1), (layer_forward_and_backward, 2), (spectral, 1)):
        caught = _caught(run)
        assert len(caught) >= at_least, [str(w.message) for w in caught]
        assert {w.filename for w in caught} == {__file__}, [(w.filename, w.lineno)
                                                           for w in caught]


def test_z0_of_the_wrong_shape_is_named_up_front() -> None:
    """A z0 that f cannot take is rejected before the solve, naming z0, its shape and the
    expected one; a z0 f does take (a state not shaped like x) still works, checked once."""
    layer = contdeq.DEQ(Cell(32))
    x = torch.randn(8, 32)
    with pytest.raises(ValueError, match=r"z0 has shape \(8, 31\).*pass z0 of shape \(8, 32\)"):
        layer(x, z0=torch.zeros(8, 31))

    class Wide(nn.Module):  # state of width 16 for an input of width 4
        def __init__(self) -> None:
            super().__init__()
            self.u = nn.Linear(4, 16)
            self.calls = 0

        def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return 0.5 * torch.tanh(z + self.u(x))

    wide = Wide()
    layer = contdeq.DEQ(wide, solver="picard", on_nonconvergence="raise")
    x = torch.randn(3, 4)
    with torch.no_grad():
        layer(x, z0=torch.zeros(3, 16))
        first = wide.calls
        layer(x, z0=torch.zeros(3, 16))
    assert wide.calls - first == layer.stats.forward.nfe  # the shape check ran only once


def test_steady_state_names_the_func_signature() -> None:
    """A one-argument func gets an error about func(t, z), with the wrapper to write."""
    with pytest.raises(TypeError, match=r"func must be callable as func\(t, z\).*lambda t, z"):
        steady_state(lambda z: -z, torch.ones(2, 3))


def test_dtype_and_device_messages_name_the_fix() -> None:
    """z0 of another dtype than x: the message says how to convert it."""
    layer = contdeq.DEQ(Cell())
    with pytest.raises(TypeError, match=r"z0 must have x's dtype torch.float32.*\.to\(x\.dtype\)"):
        layer(torch.randn(2, 8), z0=torch.zeros(2, 8, dtype=torch.float64))


def test_stats_print_short() -> None:
    """print(layer.stats) is one short line at batch 256 (the tensors stay attributes)."""
    layer = contdeq.DEQ(Cell())
    x = torch.randn(256, 8, requires_grad=True)
    layer(x).sum().backward()
    text = repr(layer.stats)
    assert len(text) < 500 and "nfe=" in text and "backward:" in text, text
    assert len(repr(layer.stats.forward)) < 300
    assert layer.stats.forward.residual.shape == (256,)


def test_unrolled_ptc_raises_no_tensor_to_scalar_warning() -> None:
    """Unrolled ptc's step test converts a graph-carrying tensor to a Python float: no
    `Converting a tensor with requires_grad=True to a scalar` warning."""
    torch.manual_seed(1)
    layer = contdeq.DEQ(Cell(), method="ptc", backward="unrolled")
    x = torch.randn(4, 8)
    caught = _caught(lambda: layer(x))
    assert not [w for w in caught if "to a scalar" in str(w.message)], caught
    assert layer.stats.forward.all_converged


def test_unrolled_ptc_backward_matches_the_implicit_gradient() -> None:
    """Backpropagation through ptc's steps (its step control reads the residual norms, so the
    graph runs through them) works, and at a tight tolerance its input gradient is the
    implicit one (it raised "modified by an inplace operation" before)."""
    torch.manual_seed(2)
    cell = Cell().double()
    x = torch.randn(4, 8, dtype=torch.float64)
    grads = []
    for backward in ("unrolled", contdeq.Implicit(rtol=1e-10)):
        layer = contdeq.DEQ(cell, method="ptc", backward=backward, atol=1e-10, rtol=0.0)
        xi = x.clone().requires_grad_(True)
        layer(xi).pow(2).sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_save_checkpoint_without_epoch(tmp_path: Path) -> None:
    """A quick save needs only a path and the model."""
    model = nn.Linear(3, 2)
    path = contdeq.save_checkpoint(tmp_path / "m.pt", model)
    restored = nn.Linear(3, 2)
    checkpoint = contdeq.load_checkpoint(path, restored)
    assert checkpoint.epoch == 0
    torch.testing.assert_close(restored.weight, model.weight)


def test_failing_layer_hints_once() -> None:
    """A layer whose forward solves keep failing says once what to try (a norm cap, another
    method, max_steps); converged solves reset the count."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    # The default method (ptc) is pointed at Anderson; dopri5 at ptc, as is a solver object
    # that leaves the method to steady_state's default.
    for options, other in (({"max_steps": 3}, "solver='anderson'"),
                           ({"max_steps": 3, "method": "dopri5"}, "method='ptc'"),
                           ({"solver": contdeq.ForwardSolver("ode", max_steps=3)},
                            "method='ptc'")):
        layer = contdeq.DEQ(Expanding(), **options)
        hints = []
        for _ in range(HINT_AFTER + 2):
            caught = _caught(lambda layer=layer: layer(x))
            hints += [w for w in caught if "What usually helps" in str(w.message)]
        assert len(hints) == 1
        message = str(hints[0].message)
        assert "spectral_norm_cap" in message and other in message
        assert "max_steps (now 3)" in message and hints[0].filename == __file__


def _load_demo() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo"] = module
    spec.loader.exec_module(module)
    return module


def test_demo_times_epochs_after_the_warm_up(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's s/epoch is the median of the epochs after the first: with a clock on which
    every first epoch takes 100 s and the others 1 s, every row reads 1.00."""
    pytest.importorskip("sklearn", reason="the demo reads scikit-learn's digits")
    demo = _load_demo()
    ticks = iter([0.0, 100.0, 100.0, 101.0, 101.0, 102.0] * 6)
    monkeypatch.setattr(demo, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    digits = demo.load_digits()
    small = types.SimpleNamespace(data=digits.data[:300], target=digits.target[:300])
    monkeypatch.setattr(demo, "load_digits", lambda: small)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        demo.training_table(epochs=3, width=8, batch=250)
    rows = capsys.readouterr().out.strip().splitlines()[-6:]
    assert [row.split()[-1] for row in rows] == ["1.00"] * 6, rows


def test_extras_keep_torch_and_cover_the_tests() -> None:
    """No extra pulls a package whose metadata replaces a CPU torch (torchattacks needs
    torchvision: installed with --no-deps instead), and `test` holds what the test modules
    import at collection (the examples' packages, the benchmarks' tqdm, torchdeq)."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    names = {extra: {req.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip()
                     for req in reqs} for extra, reqs in extras.items()}
    for extra, packages in names.items():
        assert not packages & {"torchattacks", "torchvision"}, extra
    assert names["examples"] <= names["test"]
    assert {"tqdm", "matplotlib", "torchdeq"} <= names["test"]
    assert "robust" not in names

