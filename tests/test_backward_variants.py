"""Backward variants: phantom gradients, a truncated (capped) adjoint, a warm-started adjoint."""

from __future__ import annotations

import copy
import itertools
import pickle
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import contdeq
from contdeq.implicit import BACKWARD_MODES, solve_adjoint
from contdeq.solvers import ConvergenceError, ConvergenceWarning

from .layer_models import TanhCell

TIGHT = {"solver": "anderson", "atol": 1e-13, "rtol": 1e-13, "max_steps": 300}


def layer_gradients(backward: contdeq.BackwardMode, lipschitz: float = 0.5, batch: int = 3,
                    seed: int = 0) -> tuple[list[Tensor], Tensor, TanhCell, Tensor, Tensor]:
    """Gradients of ``sum(z* * g)`` w.r.t. ``f``'s parameters and ``x`` through a float64
    ``DEQ`` with ``backward``; also ``z*``, ``f``, ``x``, ``g`` for references."""
    torch.manual_seed(seed)
    f = TanhCell(4, 3, lipschitz=lipschitz)
    layer = contdeq.DEQ(f, state_shape=4, backward=backward, **TIGHT)
    x = torch.randn(batch, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(batch, 4, dtype=torch.float64)
    z = layer(x)
    grads = torch.autograd.grad((z * g).sum(), [*f.parameters(), x])
    return list(grads), z.detach(), f, x, g


def test_phantom_equals_the_gradient_of_k_unrolled_damped_steps() -> None:
    """Phantom(k, lambda) is autograd through k steps z <- (1-lambda) z + lambda f(z, x) from z*:
    catches a wrong damping placement, an off-by-one in the number of terms, or a missing
    final factor lambda."""
    for steps, damping in ((1, 0.5), (3, 1.0), (5, 0.7)):
        grads, z_star, f, x, g = layer_gradients(contdeq.Phantom(steps, damping))
        z = z_star.clone()  # the k steps written out, from the (detached) equilibrium
        for _ in range(steps):
            z = (1 - damping) * z + damping * f(z, x)
        reference = torch.autograd.grad((z * g).sum(), [*f.parameters(), x])
        for ours, ref in zip(grads, reference, strict=True):
            torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-11)


def test_phantom_tends_to_the_implicit_gradient_as_steps_grow() -> None:
    """On a contractive f the phantom gradient converges to the implicit one (float64): catches
    a series that sums the wrong operator (it would converge elsewhere or diverge)."""
    exact, *_ = layer_gradients(contdeq.Implicit(rtol=1e-13, max_steps=300), lipschitz=0.7)
    errors = []
    for steps in (1, 4, 16, 64, 160):
        approx, *_ = layer_gradients(contdeq.Phantom(steps, 0.5), lipschitz=0.7)
        errors.append(max(float((a - e).norm() / e.norm()) for a, e in zip(approx, exact,
                                                                         strict=True)))
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))
    assert errors[0] > 1e-2  # one step is not the implicit gradient on this f
    assert errors[-1] < 1e-9


def test_phantom_records_its_fixed_cost_and_validates_its_arguments() -> None:
    """layer.stats.backward counts steps - 1 VJPs with stop_reason "depth" (no convergence
    claim from a test that never ran: residual NaN); bad steps/damping name the argument."""
    torch.manual_seed(0)
    layer = contdeq.DEQ(TanhCell(4, 3), state_shape=4, backward="phantom", **TIGHT)
    layer(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    back = layer.stats.backward
    assert (back.nfe, back.stop_reason) == (4, "depth")
    assert bool(torch.isnan(back.residual).all())
    assert BACKWARD_MODES["phantom"] is contdeq.Phantom
    for kwargs, name in (({"steps": 0}, "steps"), ({"damping": 0.0}, "damping"),
                         ({"damping": 1.5}, "damping"), ({"damping": "x"}, "damping")):
        with pytest.raises(ValueError, match=name):
            contdeq.Phantom(**kwargs)


def test_truncated_adjoint_reports_nonconvergence_honestly() -> None:
    """An Implicit backward capped below what its tolerance needs (DeepEquilibriumNetworks.jl's
    truncated adjoint) says so: converged False / stop "max_steps" in the stats, a warning or
    an error as configured. Catches a capped solve reported as converged."""
    capped = contdeq.Implicit(rtol=1e-10, max_steps=2, on_nonconvergence="ignore")
    torch.manual_seed(0)
    layer = contdeq.DEQ(TanhCell(4, 3, lipschitz=0.9), state_shape=4, backward=capped, **TIGHT)
    x = torch.randn(3, 3, dtype=torch.float64)
    layer(x).sum().backward()
    back = layer.stats.backward
    assert back.stop_reason == "max_steps" and not bool(back.converged.any())
    assert bool((back.residual > back.tolerance).all())
    layer.backward_mode = contdeq.Implicit(rtol=1e-10, max_steps=2)  # the layer's "warn"
    with pytest.warns(ConvergenceWarning, match="backward"):
        layer(x).sum().backward()
    layer.backward_mode = contdeq.Implicit(rtol=1e-10, max_steps=2, on_nonconvergence="raise")
    with pytest.raises(ConvergenceError):
        layer(x).sum().backward()


@pytest.mark.parametrize("start", ["previous", "scaled"])
def test_warm_start_gives_the_cold_gradient(start: str) -> None:
    """WarmImplicit's gradients equal Implicit's (same tolerance) on consecutive backward passes,
    across a batch-size change and on a new batch: catches a guess that leaks into the answer
    (e.g. a stale w returned, or a guess of the wrong batch used)."""
    torch.manual_seed(0)
    f = TanhCell(4, 3, lipschitz=0.8)
    mode = contdeq.WarmImplicit(rtol=1e-11, max_steps=300, start=start)
    warm = contdeq.DEQ(f, state_shape=4, backward=mode, **TIGHT)
    cold = contdeq.DEQ(f, state_shape=4, backward=contdeq.Implicit(rtol=1e-11, max_steps=300),
                       **TIGHT)
    for batch in (4, 2, 4):
        x = torch.randn(batch, 3, dtype=torch.float64)
        g = torch.randn(batch, 4, dtype=torch.float64)
        ours = torch.autograd.grad((warm(x) * g).sum(), list(f.parameters()))
        ref = torch.autograd.grad((cold(x) * g).sum(), list(f.parameters()))
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_warm_start_reuses_the_previous_solution() -> None:
    """The same batch again: a "previous" warm start needs fewer VJPs than the cold first pass
    (catches a guess that is computed but never passed to the solver)."""
    torch.manual_seed(0)
    layer = contdeq.DEQ(TanhCell(4, 3, lipschitz=0.9), state_shape=4,
                        backward=contdeq.WarmImplicit(rtol=1e-8, start="previous"), **TIGHT)
    x = torch.randn(4, 3, dtype=torch.float64)
    nfe = []
    for _ in range(2):
        layer(x).pow(2).sum().backward()
        nfe.append(layer.stats.backward.nfe)
    assert nfe[1] <= nfe[0] // 2


def test_equilibrium_warns_that_a_warm_mode_by_name_never_warm_starts() -> None:
    """Catches ``equilibrium(..., backward="implicit_warm")`` silently building a fresh mode on
    every call (it never warm-starts): a UserWarning at the caller's line says to build the
    mode once; a kept mode object and the layers' shorthand (one mode per layer) do not warn."""
    import warnings

    from contdeq import ForwardSolver
    from contdeq.implicit import equilibrium

    torch.manual_seed(0)
    f = TanhCell(4, 3, lipschitz=0.9)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    z0 = torch.zeros(2, 4, dtype=torch.float64)
    solver = ForwardSolver("picard", atol=1e-8, rtol=1e-8)
    with pytest.warns(UserWarning, match="never carries anything") as caught:
        equilibrium(f, x, z0, solver=solver, backward="implicit_warm")
    assert caught[0].filename == __file__
    mode = contdeq.WarmImplicit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            z, _ = equilibrium(f, x, z0, solver=solver, backward=mode)
            z.sum().backward()
        equilibrium(f, x, z0, solver=solver, backward="implicit")
        contdeq.DEQ(TanhCell(4, 3), state_shape=4, backward="implicit_warm")(x)


def test_solve_adjoint_starts_from_w0_and_checks_it() -> None:
    """solve_adjoint(w0=the solution) stops at once for every method; a w0 of the wrong shape is
    refused with a message naming w0."""
    a = 0.4 * torch.eye(3, dtype=torch.float64) + 0.1
    v = torch.randn(2, 3, dtype=torch.float64)

    def vjp(w: Tensor) -> Tensor:
        return w @ a

    exact = torch.linalg.solve(torch.eye(3, dtype=torch.float64) - a.T, v.T).T
    for method in ("anderson", "picard", "gmres"):
        _, cold_stats = solve_adjoint(vjp, v, method=method, rtol=1e-10)
        warm, warm_stats = solve_adjoint(vjp, v, method=method, rtol=1e-10, w0=exact)
        torch.testing.assert_close(warm, exact)
        assert warm_stats.nfe < cold_stats.nfe, method
    with pytest.raises(ValueError, match="w0"):
        solve_adjoint(vjp, v, w0=v[:1])


def test_warm_mode_copies_start_afresh_and_validates() -> None:
    """A layer with a WarmImplicit deep-copies and pickles (the per-thread memory is dropped, a
    copy starts cold); a bad start names the argument."""
    layer = contdeq.DEQ(TanhCell(3, 3), backward=contdeq.WarmImplicit(start="previous"))
    mode = layer.backward_mode
    mode._memory.previous = torch.ones(2, 3)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.backward_mode == mode
        assert getattr(clone.backward_mode._memory, "previous", None) is None
    with pytest.raises(ValueError, match="start"):
        contdeq.WarmImplicit(start="next")


def test_backward_variants_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks/backward_variants.py runs and counts each variant's backward work: phantom k
    makes exactly k - 1 VJPs, jfb none, the implicit solve at least one."""
    pytest.importorskip("sklearn")
    from benchmarks import backward_variants

    rows = backward_variants.main(["--smoke", "--tasks", "digits-mlp", "--models",
                                   "DEQ(ode, ptc)", "--variants", "implicit", "phantom 3/1",
                                   "jfb", "--out", str(tmp_path)])
    iters = {r["variant"]: r["backward_iterations"] for r in rows}
    assert iters["phantom 3/1"] == 2 and iters["jfb"] == 0 and iters["implicit"] >= 1
    assert (tmp_path / "backward_variants_smoke.md").is_file()


def _functional(layer: nn.Module) -> tuple[list[str], list[Tensor]]:
    names = [n for n, _ in layer.named_parameters()]
    return names, [p.detach().clone().requires_grad_() for p in layer.parameters()]


@pytest.mark.parametrize("start", ["previous", "scaled"])
def test_gradcheck_warm_implicit(start: str) -> None:
    """Finite differences agree with the warm-started gradient; gradcheck runs many backward
    passes, so every one after the first starts from the remembered guess. Repeated backward
    passes differ within the solve's tolerance (the guess differs), hence ``nondet_tol``. Its
    zero-``grad_output`` check catches a remembered guess leaking into a zero gradient."""
    torch.manual_seed(0)
    layer = contdeq.DEQ(TanhCell(3, 2), state_shape=3, **TIGHT,
                        backward=contdeq.WarmImplicit(rtol=1e-12, max_steps=300, start=start))
    names, params = _functional(layer)
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)

    def fn(x: Tensor, *ps: Tensor) -> Tensor:
        return functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4,
                                    nondet_tol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_ode_backward_takes_its_integrator_from_options(seed: int) -> None:
    """Implicit("ode", options={"method": "bosh3"}) integrates the adjoint with bosh3 (it
    raised TypeError: ``method`` reached solve_adjoint twice) and its gradient matches the
    default integrator's and the tight fixed-point solve's."""
    lipschitz = (0.3, 0.6, 0.9)[seed]
    exact, *_ = layer_gradients(contdeq.Implicit(rtol=1e-12, max_steps=300), lipschitz, seed=seed)
    for options in ({}, {"method": "bosh3"}):
        mode = contdeq.Implicit("ode", rtol=1e-8, max_steps=2000, options=options,
                                on_nonconvergence="raise")
        grads, *_ = layer_gradients(mode, lipschitz, seed=seed)
        for ours, ref in zip(grads, exact, strict=True):
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    torch.manual_seed(seed)
    layer = contdeq.DEQ(TanhCell(4, 3, lipschitz=lipschitz), state_shape=4, **TIGHT,
                        backward_method="ode", backward_options={"method": "bosh3"})
    layer(torch.randn(3, 3, dtype=torch.float64)).sum().backward()
    assert layer.stats.backward.method == "bosh3"


def test_solve_adjoint_options_mapping_and_deprecated_keywords() -> None:
    """solve_adjoint(options=...) carries the "ode" integrator; the old keyword spelling of a
    solver option still works, with a DeprecationWarning naming ``options=``."""
    a = 0.4 * torch.eye(3, dtype=torch.float64) + 0.1
    v = torch.randn(2, 3, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(3, dtype=torch.float64) - a.T, v.T).T
    w, stats = solve_adjoint(lambda w: w @ a, v, method="ode", rtol=1e-6, max_steps=2000,
                             options={"method": "bosh3"}, on_nonconvergence="raise")
    assert stats.method == "bosh3"
    torch.testing.assert_close(w, exact, rtol=1e-4, atol=1e-6)
    new, _ = solve_adjoint(lambda w: w @ a, v, rtol=1e-10, options={"memory": 3})
    with pytest.warns(DeprecationWarning, match="options="):
        old, _ = solve_adjoint(lambda w: w @ a, v, rtol=1e-10, memory=3)
    assert torch.equal(old, new)


@pytest.mark.parametrize("mode", [contdeq.Implicit, contdeq.WarmImplicit])
def test_implicit_tol_is_the_deprecated_spelling_of_rtol(mode: type[contdeq.Implicit]) -> None:
    """``Implicit(tol=...)`` (and ``WarmImplicit``) still works for one release: a
    DeprecationWarning at the caller's line names ``rtol``, and the mode, its gradients and
    its backward iterations are those of ``rtol=``. Positionally the tolerance is still the
    second field; passing both spellings raises TypeError; reading ``.tol`` warns likewise."""
    new = mode("picard", rtol=1e-11, max_steps=300)
    with pytest.warns(DeprecationWarning, match=r"tol=\.\.\.\) is deprecated.*use rtol=") as rec:
        old = mode("picard", tol=1e-11, max_steps=300)
    assert rec[0].filename == __file__
    assert old == new == mode("picard", 1e-11, 300) and old.rtol == 1e-11
    with pytest.warns(DeprecationWarning, match="use rtol="):
        assert mode("picard", None, 300, tol=1e-11) == new
    constructor, arguments, state = new.__reduce_ex__(1)[:3]  # as pickled before the rename
    old_state = {("tol" if name == "rtol" else name): value for name, value in state.items()}

    class Pickled:
        def __reduce__(self) -> tuple:
            return constructor, arguments, old_state

    assert pickle.loads(pickle.dumps(Pickled())) == new
    assert "rtol=1e-11" in repr(old) and " tol=" not in repr(old)
    outcomes = []
    for backward in (old, new):
        torch.manual_seed(0)
        layer = contdeq.DEQ(TanhCell(4, 3, lipschitz=0.7), state_shape=4, backward=backward,
                            **TIGHT)
        x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
        grads = torch.autograd.grad(layer(x).square().sum(), [*layer.parameters(), x])
        outcomes.append((grads, layer.stats.backward.nfe, layer.stats.backward.steps))
    (old_grads, *old_iterations), (new_grads, *new_iterations) = outcomes
    assert old_iterations == new_iterations and old_iterations[0] > 1
    assert all(torch.equal(a, b) for a, b in zip(old_grads, new_grads, strict=True))
    with pytest.raises(TypeError, match=r"pass rtol=\.\.\. only \(tol is its deprecated"):
        mode(tol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="pass rtol"):
        mode("picard", 1e-6, tol=1e-6)
    with pytest.warns(DeprecationWarning, match=r"\.tol is deprecated.*read \.rtol"):
        assert new.tol == 1e-11


def test_solve_adjoint_tol_is_the_deprecated_spelling_of_rtol() -> None:
    """``solve_adjoint(tol=...)`` warns (naming ``rtol``, at the caller's line) and returns the
    same ``w`` and iterations as ``rtol=``; both spellings together raise TypeError."""
    gen = torch.Generator().manual_seed(3)
    a = 0.6 * torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))[0]
    v = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    new, new_stats = solve_adjoint(lambda w: w @ a, v, method="anderson", rtol=1e-9)
    with pytest.warns(DeprecationWarning, match=r"solve_adjoint\(tol=\.\.\.\).*use rtol=") as rec:
        old, old_stats = solve_adjoint(lambda w: w @ a, v, method="anderson", tol=1e-9)
    assert rec[0].filename == __file__
    assert torch.equal(old, new)
    assert (old_stats.nfe, old_stats.steps) == (new_stats.nfe, new_stats.steps)
    with pytest.raises(TypeError, match=r"solve_adjoint: pass rtol=\.\.\. only"):
        solve_adjoint(lambda w: w @ a, v, tol=1e-9, rtol=1e-9)
