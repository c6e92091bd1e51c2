"""Helpers shared by the benchmark scripts: timing, memory of the autograd graph, output."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.autograd.graph import saved_tensors_hooks
from tqdm import tqdm

RESULTS = Path(__file__).parent / "results"


def progress_bar(total: int, desc: str) -> tqdm:
    """A progress bar on stderr when it is a terminal; off otherwise (tqdm's ``disable=None``),
    so logs, CI and tests get none."""
    return tqdm(total=total, desc=desc, disable=None, leave=False, dynamic_ncols=True)


def time_min(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` timed runs of ``fn()`` in seconds, after one warm-up run.

    The minimum, not the median: on a shared machine other load only ever adds time, so the
    fastest run is the best estimate of the code's own cost.
    """
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class SavedTensors:
    """Bytes the autograd graph holds for the backward (each storage counted once)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    @property
    def megabytes(self) -> float:
        return sum(self.storages.values()) / 2**20

    @contextmanager
    def record(self) -> Iterator[SavedTensors]:
        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
            # Not ``t`` itself: a saved output that holds itself (through its grad_fn) makes
            # a reference cycle that only the garbage collector frees, and the graph of a
            # NeuralODE solve then piles up between collections (35 MB per step measured).
            return t.detach()

        with saved_tensors_hooks(pack, lambda t: t):
            yield self


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine_header() -> str:
    """torch version, thread count and CPU, for table headers."""
    cpu = platform.processor() or platform.machine()
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}"


def write_results(name: str, markdown: str, rows: list[dict], out: Path = RESULTS) -> None:
    """Write ``<name>.md`` and ``<name>.json`` under ``out`` and print the Markdown."""
    print()
    print(markdown)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    print(f"written {out / name}.md and .json")
