"""docs/solvers.md, "One host read per step": how often each method reads the host per step.

A read of a tensor's value on the host (``tolist``, ``item``, ``bool``, ``float``, ``int``, or
an operation whose output size depends on values, such as ``nonzero``) waits for the device to
finish; on a GPU it stalls the queue of small kernels a solver step launches. The documented
counts are asserted per step, over random contractive maps (every residual shrinks: one read),
maps whose residual rises along the way (non-normal: the step rule's second read), batch sizes
and solves with and without frozen samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from contdeq.solvers import FIXED_POINT_METHODS, STEADY_STATE_METHODS, fixed_point, steady_state

#: Reads per step the docs promise while every active residual shrinks; the Newton-Krylov
#: methods (``implicit_ptc``, ``newton``) read once per linear iteration and are not listed.
READS_PER_STEP = {"ptc": 1, "picard": 1, "broyden": 1, "anderson": 2}
#: ... and on steps where a residual rises: one more for ptc, the Runge-Kutta pairs (at the
#: first rise) and the freezing fixed-point iteration; none for the iteration without freezing.
MORE_WHEN_RISING = 1
RUNGE_KUTTA = [m for m in STEADY_STATE_METHODS if m not in ("ptc", "implicit_ptc")]
_SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique")
_READS = ("tolist", "item", "__bool__", "__float__", "__int__")


class _SyncingOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Python-level reads other than tolist dispatch _local_scalar_dense themselves: only
        # operations that read values for their own sake are counted here.
        if func.__name__.split(".")[0] in _SYNCING_OPS[1:]:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _counting_reads() -> Iterator[dict[str, int]]:
    counts = {"reads": 0}
    originals = {name: getattr(torch.Tensor, name) for name in _READS}

    def counted(original: Callable) -> Callable:
        def read(self, *args, **kwargs):
            counts["reads"] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    mode = _SyncingOps()
    try:
        with mode:
            yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        counts["reads"] += mode.count


def _problem(seed: int, batch: int, width: int, frozen: int
             ) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """A random contraction ``g(z) = tanh(W z + x)``; the last ``frozen`` samples have
    ``x = 0`` and start at their fixed point ``z = 0`` (frozen from the first test)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(width, width, generator=gen)
    w = w * (0.9 / torch.linalg.matrix_norm(w, 2))
    x = torch.randn(batch, width, generator=gen)
    x[batch - frozen:] = 0.0
    return (lambda z: torch.tanh(z @ w.T + x)), torch.zeros(batch, width)


def _rising(seed: int, batch: int, width: int
            ) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """``g(z) = A z + x`` with ``A = I / 2 + 2.5 N`` (``N`` the shift): spectral radius 1/2, so
    the iteration converges, but non-normal, so residuals rise for several steps first."""
    gen = torch.Generator().manual_seed(seed)
    a = 0.5 * torch.eye(width) + 2.5 * torch.diag(torch.ones(width - 1), 1)
    x = torch.randn(batch, width, generator=gen)
    return (lambda z: z @ a.T + x), torch.zeros(batch, width)


def _reads_per_step(solve: Callable[[int], object]) -> float:
    """Host reads per step between a solve of 4 and one of 10 steps (tolerances that no moving
    sample meets, so both take every step)."""
    per_solve = []
    for max_steps in (4, 10):
        with torch.no_grad(), _counting_reads() as counts:
            _, stats = solve(max_steps)
        assert stats.steps == max_steps
        per_solve.append(counts["reads"])
    return (per_solve[1] - per_solve[0]) / 6


CASES = [(seed, batch, width, frozen) for seed, batch, width, frozen in
         [(0, 16, 8, 0), (1, 33, 24, 5), (2, 7, 64, 3)]]


@pytest.mark.parametrize("method", ["ptc", *RUNGE_KUTTA])
@pytest.mark.parametrize(("seed", "batch", "width", "frozen"), CASES)
def test_steady_state_methods_read_the_host_once_per_step(
        method: str, seed: int, batch: int, width: int, frozen: int) -> None:
    g, z0 = _problem(seed, batch, width, frozen)
    reads = _reads_per_step(lambda n: steady_state(
        lambda t, z: g(z) - z, z0, method=method, atol=1e-12, rtol=1e-12, max_steps=n,
        on_nonconvergence="ignore"))
    assert reads <= READS_PER_STEP.get(method, 1), (method, reads)


@pytest.mark.parametrize("method", [m for m in FIXED_POINT_METHODS if m in READS_PER_STEP])
@pytest.mark.parametrize("freeze", [True, False])
@pytest.mark.parametrize(("seed", "batch", "width", "frozen"), CASES)
def test_fixed_point_methods_read_the_host_as_documented(
        method: str, freeze: bool, seed: int, batch: int, width: int, frozen: int) -> None:
    g, z0 = _problem(seed, batch, width, frozen)
    reads = _reads_per_step(lambda n: fixed_point(
        g, z0, method=method, atol=1e-12, rtol=1e-12, max_steps=n, freeze_converged=freeze,
        on_nonconvergence="ignore"))
    assert reads <= READS_PER_STEP[method], (method, reads)


def test_every_registered_method_is_covered_or_documented_as_krylov() -> None:
    """A newly registered method must be given its count here (and in docs/solvers.md)."""
    listed = set(READS_PER_STEP) | set(RUNGE_KUTTA) | {"implicit_ptc", "newton"}
    assert set(STEADY_STATE_METHODS) | set(FIXED_POINT_METHODS) <= listed


@pytest.mark.parametrize("method", ["ptc", *RUNGE_KUTTA])
@pytest.mark.parametrize(("seed", "batch", "width"), [(0, 16, 8), (1, 5, 12)])
def test_steady_state_methods_read_once_more_when_a_residual_rises(
        method: str, seed: int, batch: int, width: int) -> None:
    g, z0 = _rising(seed, batch, width)
    reads = _reads_per_step(lambda n: steady_state(
        lambda t, z: g(z) - z, z0, method=method, atol=1e-12, rtol=1e-12, max_steps=n,
        on_nonconvergence="ignore"))
    assert reads <= READS_PER_STEP.get(method, 1) + MORE_WHEN_RISING, (method, reads)


@pytest.mark.parametrize("method", [m for m in FIXED_POINT_METHODS if m in READS_PER_STEP])
@pytest.mark.parametrize("freeze", [True, False])
@pytest.mark.parametrize(("seed", "batch", "width"), [(0, 16, 8), (1, 5, 12)])
def test_fixed_point_methods_read_as_documented_when_a_residual_rises(
        method: str, freeze: bool, seed: int, batch: int, width: int) -> None:
    g, z0 = _rising(seed, batch, width)
    z, norms = z0, []
    for _ in range(6):  # the problem does what it is here for: Picard's residuals rise
        norms.append(torch.linalg.vector_norm(g(z) - z, dim=1))
        z = g(z)
    assert bool((norms[3] > norms[0]).any())
    reads = _reads_per_step(lambda n: fixed_point(
        g, z0, method=method, atol=1e-12, rtol=1e-12, max_steps=n, freeze_converged=freeze,
        on_nonconvergence="ignore"))
    assert reads <= READS_PER_STEP[method] + (MORE_WHEN_RISING if freeze else 0), (
        method, freeze, reads)
