"""Helpers shared by the benchmark scripts: the ``--device`` flag, timing, memory of the
autograd graph and of CUDA, output."""

from __future__ import annotations

import argparse
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
    """Fastest of ``repeats`` timed runs of ``fn()`` in seconds, after one warm-up run (CUDA
    work synchronized around each run once CUDA is in use).

    The minimum, not the median: on a shared machine other load only ever adds time, so the
    fastest run is the best estimate of the code's own cost.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    fn()
    best = float("inf")
    for _ in range(repeats):
        if cuda:  # time finished work only
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
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


def parse_device(text: str) -> torch.device:
    """``--device``'s value: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"`` on a machine that has it."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"--device must be 'cpu' or 'cuda[:N]', got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"--device {text}: no CUDA device is available (torch.cuda.is_available() is False)")
    return device


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default ``cpu``), parsed to a ``torch.device`` by :func:`parse_device`.
    On CUDA, :func:`write_results` adds the run's peak CUDA memory to the table."""
    parser.add_argument("--device", type=parse_device, default=torch.device("cpu"),
                        help="cpu (default) or cuda[:N]; on CUDA the results add the peak "
                             "CUDA memory (torch.cuda.max_memory_allocated)")


def peak_cuda_megabytes(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` of ``device`` in MiB since the last reset (``None``
    off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine_header() -> str:
    """torch version, thread count and CPU, for table headers."""
    cpu = platform.processor() or platform.machine()
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}"


def write_results(name: str, markdown: str, rows: list[dict], out: Path = RESULTS) -> None:
    """Write ``<name>.md`` and ``<name>.json`` under ``out`` and print the Markdown. When the run
    used CUDA, a last line gives its peak CUDA memory (over the whole run)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated() / 2**20
        markdown = f"{markdown.rstrip()}\n\nPeak CUDA memory of the run: {peak:.1f} MiB " \
                   "(torch.cuda.max_memory_allocated).\n"
    print()
    print(markdown)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    print(f"written {out / name}.md and .json")
