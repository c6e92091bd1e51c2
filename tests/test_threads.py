"""One layer shared by several threads: each call's results (``layer.stats``, the auxiliary
loss terms) and gradients are its own, with ``spectral_norm_cap`` weights too."""

from __future__ import annotations

import copy
import pickle
import threading
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

import contdeq

THREADS = 4
CALLS = 2  # per thread


class Cell(nn.Module):
    def __init__(self, width: int = 6, cap: float | None = None) -> None:
        super().__init__()
        self.W = nn.Linear(width, width, dtype=torch.float64)
        self.U = nn.Linear(width, width, dtype=torch.float64)
        if cap is not None:
            contdeq.spectral_norm_cap(self.W, cap=cap)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.W(z) + self.U(x))


@pytest.fixture(autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    """Four Python threads, each with torch's full intra-op pool, crawl on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_in_threads(call: Callable[[int, threading.Barrier], None]) -> None:
    """``call(k, barrier)`` for ``k`` in ``range(THREADS * CALLS)``, ``THREADS`` at a time (the
    barrier lines the threads up before each call; ``call`` may wait on it once more);
    re-raises the first failure."""
    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def worker(thread: int) -> None:
        for i in range(CALLS):
            try:
                barrier.wait()
                call(thread * CALLS + i, barrier)
            except threading.BrokenBarrierError:  # another thread failed
                return
            except BaseException as exc:  # re-raised below
                errors.append(exc)
                barrier.abort()  # the other threads stop waiting for this one
                return

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]


def inputs(k: int) -> Tensor:
    """Call ``k``'s input: batch size ``1 + k`` (so every call's stats are told apart)."""
    return torch.randn(1 + k, 6, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(k))


def test_stats_are_those_of_the_calling_threads_last_call() -> None:
    """Catches ``layer.stats`` holding another thread's result (seen in 1 of 40 calls)."""
    torch.manual_seed(0)
    layer = contdeq.DEQ(Cell(), atol=1e-4, rtol=1e-4).eval()

    def call(k: int, barrier: threading.Barrier) -> None:
        x = inputs(k)
        with torch.no_grad():
            z = layer(x)
        barrier.wait()  # every thread's call is done before any reads its stats
        stats = layer.stats
        assert stats is not None and stats.forward.converged.shape == (x.shape[0],)
        residual = (layer.f(z, x) - z).pow(2).mean(dim=1).sqrt()
        torch.testing.assert_close(stats.forward.residual, residual, rtol=1e-6, atol=1e-14)

    run_in_threads(call)


def test_aux_loss_is_the_calling_threads_skip_term() -> None:
    """Catches ``aux_loss`` summing another thread's skip term (1-12 of 40 calls failed)."""
    torch.manual_seed(0)
    layer = contdeq.SkipDEQ(Cell(), nn.Linear(6, 6, dtype=torch.float64), atol=1e-6, rtol=1e-6,
                            skip_weight=0.5)

    def call(k: int, barrier: threading.Barrier) -> None:
        x = inputs(k)
        z = layer(x)
        barrier.wait()  # every thread's forward is done before any collects its terms
        expected = 0.5 * (layer.predictor(x) - z.detach()).pow(2).mean()
        torch.testing.assert_close(contdeq.aux_loss(layer), expected, rtol=1e-12, atol=0)

    run_in_threads(call)


def gradients_match_a_sequential_run(layer: nn.Module, loss: Callable[[Tensor], Tensor]) -> None:
    """Each threaded call's gradients equal those of the same call made alone."""
    params = [p for p in layer.parameters() if p.requires_grad]
    reference = [torch.autograd.grad(loss(inputs(k)), params) for k in range(THREADS * CALLS)]

    def call(k: int, barrier: threading.Barrier) -> None:
        grads = torch.autograd.grad(loss(inputs(k)), params)
        for g, r in zip(grads, reference[k], strict=True):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)

    run_in_threads(call)


def test_neural_ode_with_spectral_norm_cap_under_threads() -> None:
    """Catches torch's process-global parametrization cache shared by threads ("backward
    through the graph a second time" in 38 of 40 calls, or another call's weights)."""
    torch.manual_seed(0)
    node = contdeq.NeuralODE(Cell(cap=0.9), t_end=1.0).eval()  # eval: u, v stay fixed
    gradients_match_a_sequential_run(node, lambda x: node(x).square().sum())


def test_neural_sde_with_spectral_norm_cap_under_threads() -> None:
    """Catches NeuralSDE's use of torch's process-global parametrization cache (another
    thread's capped weight and graph)."""
    class NoNoise(nn.Module):  # no parameters: eval mode does not call g
        def forward(self, z: Tensor, x: Tensor) -> Tensor:
            return torch.zeros_like(z)

    torch.manual_seed(0)
    sde = contdeq.NeuralSDE(Cell(cap=0.9), NoNoise(), dt=0.1).eval()  # eval: no noise
    gradients_match_a_sequential_run(sde, lambda x: sde(x).square().sum())


def test_weight_tied_masks_under_threads() -> None:
    """Each thread's masked unroll uses its own application's masks, and the modules' own
    forward comes back once all are done. Catches the masked weights shadowing the modules'
    forward for every thread (another call's mask, the unmasked weight, or "'Linear' object
    has no attribute 'forward'" when the first call to finish removed the shadow)."""
    local = threading.local()

    class Meeting(Cell):
        """Waits, at a call's first application, until every thread is inside its unroll."""

        def forward(self, z: Tensor, x: Tensor) -> Tensor:
            barrier = getattr(local, "barrier", None)
            if barrier is not None:
                local.barrier = None
                barrier.wait()
            return super().forward(z, x)

    torch.manual_seed(0)
    cell = Meeting()
    layer = contdeq.WeightTied(cell, 3, masks="distinct", sparsity=0.5)
    with torch.no_grad():
        reference = [layer(inputs(k)) for k in range(THREADS * CALLS)]

    def call(k: int, barrier: threading.Barrier) -> None:
        local.barrier = barrier
        with torch.no_grad():
            out = layer(inputs(k))
        torch.testing.assert_close(out, reference[k], rtol=0, atol=0)

    run_in_threads(call)
    assert "forward" not in vars(cell.W) and "forward" not in vars(cell.U)


def test_skip_reg_term_with_spectral_norm_cap_under_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the same cache sharing in the equilibrium layers: the Skip-Reg term
    differentiates ``f(0, x)`` through the capped weight, computed inside the layer's call."""
    # The power iteration advances every training call: frozen here so that a sequential run
    # is a reference (the cache, not the update, is under test).
    monkeypatch.setattr(contdeq.nn.deq, "update_normalization", lambda f: 0)
    torch.manual_seed(0)
    layer = contdeq.SkipRegDEQ(Cell(cap=0.9), atol=1e-5, rtol=1e-5)

    def loss(x: Tensor) -> Tensor:
        layer(x)
        return contdeq.aux_loss(layer)

    gradients_match_a_sequential_run(layer, loss)


def test_copies_start_without_results_and_work() -> None:
    """Catches the per-thread store breaking ``copy.deepcopy`` / pickling of a layer."""
    torch.manual_seed(0)
    layer = contdeq.SkipRegDEQ(Cell(), atol=1e-6, rtol=1e-6)
    z = layer(inputs(1))
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.stats is None and clone.aux_terms == {}
        torch.testing.assert_close(clone(inputs(1)), z)
        assert clone.stats is not None and "skip" in clone.aux_terms
    assert layer.stats is not None and "skip" in layer.aux_terms


class OneStep(contdeq.nn.Modifier):
    """Caps the forward solve at one step, recording which threads asked for its solver."""

    def __init__(self) -> None:
        self.threads: set[int] = set()

    def solver(self, base: contdeq.ForwardSolver, training: bool) -> contdeq.ForwardSolver:
        self.threads.add(threading.get_ident())
        return base.with_options(max_steps=1)


def test_a_block_entered_in_one_thread_does_not_reach_another() -> None:
    """Catches ``layer.using(modifier)`` kept on the shared layer: while one thread is inside
    the block (waiting), another thread's forward must solve without the modifier (more than
    one step, its hook never asked for), and the block's own forward with it (one step)."""
    layer = contdeq.DEQ(Cell(), solver="anderson", atol=1e-8, rtol=1e-8,
                        on_nonconvergence="ignore").eval()
    modifier, steps, errors = OneStep(), {}, []
    inside, other_done = threading.Event(), threading.Event()

    def in_block() -> None:
        try:
            with layer.using(modifier):
                inside.set()
                assert other_done.wait(timeout=60)
                with torch.no_grad():
                    layer(inputs(1))
                steps["block"] = layer.stats.forward.steps
        except BaseException as exc:  # re-raised below
            errors.append(exc)
            inside.set()

    def beside() -> None:
        try:
            assert inside.wait(timeout=60)
            with torch.no_grad():
                layer(inputs(2))
            steps["other"] = layer.stats.forward.steps
        except BaseException as exc:  # re-raised below
            errors.append(exc)
        finally:
            other_done.set()

    workers = [threading.Thread(target=in_block), threading.Thread(target=beside)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    assert steps["block"] == 1 < steps["other"]
    assert modifier.threads == {workers[0].ident}
    assert layer.solver_and_backward() == (layer.eval_solver, layer.backward_mode)


def test_copies_do_not_carry_an_entered_block() -> None:
    """A layer copied or pickled inside a ``using`` block solves without its modifier."""
    layer = contdeq.DEQ(Cell(), solver="anderson", atol=1e-8, rtol=1e-8,
                        on_nonconvergence="ignore").eval()
    with layer.using(OneStep()):
        clones = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))]
        with torch.no_grad():
            layer(inputs(1))
        assert layer.stats.forward.steps == 1
        for clone in clones:
            assert clone.solver_and_backward() == (clone.eval_solver, clone.backward_mode)
            with torch.no_grad():
                clone(inputs(1))
            assert clone.stats.forward.steps > 1
