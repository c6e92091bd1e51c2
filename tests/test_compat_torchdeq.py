"""contdeq.compat.torchdeq.get_deq against torchdeq 0.1.0 itself on the same cells: the same
equilibrium to tolerance, the same number of ``func`` calls, the same kind of gradient (1-step,
phantom, implicit), and clear errors for what it does not take. torchdeq is in the ``test``
extra (it needs only torch and NumPy)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import contdeq
from contdeq.compat.torchdeq import DEFAULTS, SOLVERS, get_deq

torchdeq = pytest.importorskip("torchdeq", reason="torchdeq 0.1.0 is in the 'test' extra")

CELLS = ("dense", "conv")


class Dense(nn.Module):
    """``tanh(W z + U x)`` with ``||W||_2 = 0.8``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = nn.Linear(width, width, bias=False)
        self.u = nn.Linear(width, width)
        with torch.no_grad():
            self.w.weight.mul_(0.8 / torch.linalg.matrix_norm(self.w.weight, 2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.w(z) + self.u(x))


class Conv(nn.Module):
    """``relu(conv(z) + x)`` with the convolution scaled to a contraction."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(0.5 / self.conv.weight.abs().sum(dim=(1, 2, 3)).max())

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(z) + x)


def _problem(kind: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    if kind == "dense":
        return Dense(24).double(), torch.randn(6, 24, dtype=torch.float64)
    return Conv(3).double(), torch.randn(4, 3, 6, 6, dtype=torch.float64)


def _run(deq: nn.Module, cell: nn.Module, x: torch.Tensor) -> tuple[list, dict]:
    return deq(lambda z: cell(z, x), torch.zeros_like(x))


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_same_equilibrium_as_torchdeq(kind: str, solver: str, stop_mode: str) -> None:
    """Eval mode: both libraries stop within ``f_tol`` (their own per-sample L2 test) and agree
    on ``z*`` to within what that tolerance allows for a contraction of rate 0.8."""
    tol = 1e-6
    for seed in range(2):
        cell, x = _problem(kind, seed)
        kw = {"f_solver": solver, "f_max_iter": 100, "f_tol": tol, "f_stop_mode": stop_mode}
        ours, theirs = get_deq(**kw).eval(), torchdeq.get_deq(**kw).eval()
        with torch.no_grad():
            (z_c,), info_c = _run(ours, cell, x)
            (z_t,), _ = _run(theirs, cell, x)
        residual = (cell(z_c, x) - z_c).flatten(1).norm(dim=1)
        scale = z_c.flatten(1).norm(dim=1) if stop_mode == "rel" else 1.0
        assert bool((residual <= tol * scale * 1.01).all()), residual
        assert info_c["stats"].all_converged
        # ||z - z*|| <= ||z - f(z)|| / (1 - L) for each, L = 0.8.
        bound = 2 * tol * (scale if stop_mode == "abs" else z_c.flatten(1).norm(dim=1)) / 0.2
        assert bool(((z_c - z_t).flatten(1).norm(dim=1) <= bound + 1e-12).all())


@pytest.mark.parametrize("solver", ["fixed_point_iter", "anderson"])
def test_same_number_of_func_calls(solver: str) -> None:
    """``f_max_iter`` (and ``eval_f_max_iter``) cap the calls of ``func`` as in torchdeq: a
    solve that cannot reach its tolerance makes exactly that many calls in both."""
    cell, x = _problem("dense", 0)
    for kw in ({"f_max_iter": 7}, {"f_max_iter": 7, "eval_f_max_iter": 11}):
        counts = []
        for deq in (get_deq(f_solver=solver, f_tol=1e-30, on_nonconvergence="ignore", **kw),
                    torchdeq.get_deq(f_solver=solver, f_tol=1e-30, **kw)):
            calls = []

            def func(z: torch.Tensor, calls: list = calls) -> torch.Tensor:
                calls.append(1)
                return cell(z, x)

            with torch.no_grad():
                deq.eval()(func, torch.zeros_like(x))
            counts.append(len(calls))
        assert counts[0] == counts[1] == kw.get("eval_f_max_iter", 7), counts


def _grads(deq: nn.Module, cell: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    deq.train()
    cell.zero_grad()
    z_out, _ = _run(deq, cell, x)
    (z_out[-1] ** 2).sum().backward()
    return [p.grad.clone() for p in cell.parameters()]


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("gradient", [{}, {"grad": 3, "tau": 0.6}, {"ift": True},
                                      {"hook_ift": True, "b_solver": "anderson"}])
def test_same_gradient_as_torchdeq(kind: str, gradient: dict) -> None:
    """Training mode: the parameter gradients equal torchdeq's for the 1-step default, the
    phantom gradient and IFT, and the kinds differ from each other (1-step vs IFT)."""
    kw = {"f_solver": "anderson", "f_max_iter": 60, "f_tol": 1e-9, "b_max_iter": 100,
          "b_tol": 1e-9, **gradient}
    for seed in range(2):
        cell, x = _problem(kind, seed)
        ours = _grads(get_deq(**kw), cell, x)
        theirs = _grads(torchdeq.get_deq(**kw), cell, x)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
        if gradient.get("ift") or gradient.get("hook_ift"):
            one_step = _grads(get_deq(**{**kw, "ift": False, "hook_ift": False}), cell, x)
            assert max((a - b).abs().max() for a, b in zip(ours, one_step, strict=True)) > 1e-4


def test_sliced_states_as_torchdeq() -> None:
    """``n_states=2`` on the sliced core returns two supervised states, as torchdeq does."""
    cell, x = _problem("dense", 1)
    kw = {"f_max_iter": 40, "n_states": 2, "f_tol": 1e-9}
    ours, _ = _run(get_deq(**kw, on_nonconvergence="ignore").train(), cell, x)
    theirs, _ = _run(torchdeq.get_deq(**kw).train(), cell, x)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_one_dimensional_state_is_a_batch_of_scalars_as_in_torchdeq() -> None:
    """Catches a ``(B,)`` state solved as one sample: torchdeq stops each entry at
    ``|func(z) - z| < f_tol``; the RMS test over all 8 entries let the slow one stop at 2.7x
    ``f_tol``, and ``info`` had one entry instead of ``B``."""
    rate = torch.tensor([0.9] + [0.1] * 7, dtype=torch.float64)

    def func(z: torch.Tensor) -> torch.Tensor:
        return rate * z + 1.0

    kw = {"f_solver": "fixed_point_iter", "f_tol": 1e-3, "f_max_iter": 200}
    results = []
    for deq in (get_deq(**kw).eval(), torchdeq.get_deq(**kw).eval()):
        (z,), info = deq(func, torch.zeros(8, dtype=torch.float64))
        assert float((func(z) - z).abs().max()) < 1e-3
        assert info["abs_lowest"].shape == (8,) and info["nstep"].shape == (8,)
        results.append(z)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=2 * 1e-3 / 0.1)


def test_info_has_torchdeq_keys() -> None:
    """``info`` carries torchdeq's keys (so logging code keeps working) and contdeq's stats;
    ``sradius_mode`` estimates the spectral radius (0.8 bounds it for the dense cell)."""
    cell, x = _problem("dense", 0)
    deq = get_deq(f_solver="anderson", f_max_iter=60, f_tol=1e-8).eval()
    with torch.no_grad():
        _, info = deq(lambda z: cell(z, x), torch.zeros_like(x), sradius_mode=True)
    assert {"abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep", "sradius",
            "stats"} <= set(info)
    assert bool((info["abs_lowest"] < 1e-8).all())
    assert bool((info["sradius"] > 0).all()) and bool((info["sradius"] <= 0.8 + 1e-6).all())


def test_every_get_deq_keyword_is_accepted_and_documented() -> None:
    """Every keyword of torchdeq 0.1.0's get_deq (read from its constructors) is accepted,
    and docs/migration.md's table names each one and each solver name."""
    import inspect
    from pathlib import Path

    from torchdeq.core import DEQBase, DEQSliced

    theirs = set(inspect.signature(DEQBase.__init__).parameters) | set(
        inspect.signature(DEQSliced.__init__).parameters)
    theirs -= {"self", "args", "kwargs"}
    assert theirs | {"core"} == set(DEFAULTS)
    text = (Path(__file__).resolve().parents[1] / "docs" / "migration.md").read_text()
    for name in [*DEFAULTS, *SOLVERS]:
        assert f"`{name}`" in text, name


def test_unknown_and_unsupported_keywords_raise() -> None:
    """torchdeq ignores unknown keys (its issue #12); here they raise, naming the fix."""
    with pytest.raises(TypeError, match=r"unknown keyword 'max_iter'.*f_max_iter"):
        get_deq(max_iter=30)
    with pytest.raises(ValueError, match="spectral_norm_cap"):
        get_deq(norm_type="spectral_norm")
    with pytest.raises(ValueError, match="f_solver must be one of torchdeq's solvers"):
        get_deq(f_solver="newton")
    with pytest.raises(ValueError, match="core='sliced'"):
        get_deq(core="indexing", n_states=2)
    # A whole training namespace: its other keys are ignored, as torchdeq does.
    import argparse

    deq = get_deq(argparse.Namespace(lr=0.1, f_solver="broyden", f_max_iter=12))
    assert deq.f_method == "broyden" and deq.f_max_iter == 12


def test_torchdeq_intro_example_ported_by_one_import() -> None:
    """torchdeq's introductory DEQ (its README / Colab: a module holding ``get_deq(args)``,
    ``f = lambda z: layer(z, x)``, ``z_out, info = deq(f, z0)``) runs with only the import
    changed, trains, and matches torchdeq's outputs (docs/migration.md has the port)."""

    class DEQModel(nn.Module):
        def __init__(self, get: object, **deq_kwargs: object) -> None:
            super().__init__()
            self.enc = nn.Linear(8, 16)
            self.layer = Dense(16)
            self.dec = nn.Linear(16, 3)
            self.deq = get(**deq_kwargs)  # type: ignore[operator]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            u = self.enc(x)
            z_out, _info = self.deq(lambda z: self.layer(z, u), torch.zeros_like(u))
            return self.dec(z_out[-1])

    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    kwargs = {"f_solver": "anderson", "f_max_iter": 30, "f_tol": 1e-5, "ift": True}
    models = [DEQModel(get, **kwargs) for get in (get_deq, torchdeq.get_deq)]
    models[1].load_state_dict(models[0].state_dict())
    losses = []
    for model in models:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(5):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(float(nn.functional.cross_entropy(model.eval()(x), y).detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-3, abs=1e-4)
    assert isinstance(contdeq.DEQ, type)  # the rest of contdeq is one import away


def test_migration_page_snippets_run(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/migration.md's port and its contdeq-native version run as printed, in one
    namespace, and the native layer converges."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "migration.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) == 2
    torch.manual_seed(0)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/migration.md python block {i + 1}", "exec"), namespace)
    assert namespace["deq"].stats.forward.all_converged
    assert namespace["z"].shape == (32, 16)
    assert "loss" in capsys.readouterr().out

