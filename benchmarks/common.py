"""Code shared by the benchmark scripts (``python -m benchmarks.NAME``): command line, timing,
memory, tables and result files; the paper benchmark's tasks and models (every layer kind
around the same ``f``, with NFE counters) and its training, evaluation and per-row summary."""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.nn.utils import parametrize
from tqdm import tqdm

import contdeq
from contdeq.data import procedural_images

RESULTS = Path(__file__).parent / "results"
CPU = torch.device("cpu")


# -- command line, output --------------------------------------------------------------------
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
    parser.add_argument("--device", type=parse_device, default=CPU,
                        help="cpu (default) or cuda[:N]; on CUDA the results add the peak "
                             "CUDA memory (torch.cuda.max_memory_allocated)")


def make_parser(doc: str | None, out: bool = True) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first paragraph as description, ``--device`` and (unless
    ``out`` is false) ``--out`` (the results folder, default ``benchmarks/results``)."""
    parser = argparse.ArgumentParser(description=" ".join((doc or "").split("\n\n")[0].split()))
    add_device_argument(parser)
    if out:
        parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    return parser


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``n`` inside the block (``None``: unchanged)."""
    saved = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def machine_header() -> str:
    """torch version, thread count and CPU, for table headers."""
    cpu = platform.processor() or platform.machine()
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}"


def write_results(name: str, markdown: str, rows: Any, out: Path = RESULTS) -> None:
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


def table(columns: str, cells: Iterable[Iterable[object]], align: str = "",
          head: Iterable[str] = ()) -> str:
    """A Markdown table (after the lines ``head``): header ``columns`` (``"a | b"``), one row
    per item of ``cells``; ``align[i] == "r"`` right-aligns column ``i``."""
    seps = ("---:" if a == "r" else "---" for a in align.ljust(columns.count(" | ") + 1, "l"))
    return "\n".join([*head, f"| {columns} |", "|" + "|".join(seps) + "|",
                      *("| " + " | ".join(map(str, row)) + " |" for row in cells)]) + "\n"


def fmt(v: float | None, spec: str = ".2f", suffix: str = "") -> str:
    """``v`` formatted, ``"-"`` where it is missing or NaN."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}{suffix}"


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``; ``None`` where either is missing or NaN, or ``b <= 0``. A speed-up is
    ``ratio(reference time, model time)``."""
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b <= 0:
        return None
    return a / b


def mean_ci(values: list[float]) -> tuple[float, float]:
    """``(mean, half-width of the 95% Student t interval)`` over seeds (``nan`` for one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(values) / n ** 0.5


def ci_text(values: list[float], spec: str = ".1f", suffix: str = "") -> str:
    """``"mean"`` (one value) or ``"mean ± half-width"`` of :func:`mean_ci`, formatted."""
    mean, half = mean_ci(values)
    return f"{mean:{spec}}{suffix}" + ("" if math.isnan(half) else f" ± {half:{spec.lstrip('+')}}")


# -- timing, memory ----------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_min(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` timed runs of ``fn()`` in seconds, after one warm-up run (CUDA
    work synchronized around each run once CUDA is in use). The minimum, not the median: on a
    shared machine other load only ever adds time."""
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


def interleaved(runs: dict[str, Callable[[], dict]], repeats: int,
                failed: Callable[[Exception], dict]) -> tuple[dict[str, dict], dict[str, float]]:
    """Each of ``runs`` once per repeat, in turn (a drift in the machine's speed reaches all
    alike): the last output of each and its median seconds. A run that raises gives
    ``failed(exc)``: an outcome to record, not a reason to stop."""
    outs: dict[str, dict] = {}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            try:
                outs[name] = run()
            except Exception as exc:
                outs[name] = failed(exc)
            times[name].append(time.perf_counter() - start)
    return outs, {name: statistics.median(t) for name, t in times.items()}


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


def contractive(width: int, batch: int, seed: int = 0, device: torch.device | str = CPU,
                norm: float = 0.9) -> tuple[Tensor, Tensor]:
    """``(W, x)``: ``W`` ``(width, width)`` with ``||W||_2 = norm`` and ``x`` ``(batch, width)``,
    drawn on the CPU (the same numbers on every device) and moved to ``device``: the
    contractive layer ``f(z) = tanh(z W^T + x)`` of the solver benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(width, width, generator=gen)
    w = norm * w / torch.linalg.matrix_norm(w, 2)
    return w.to(device), torch.randn(batch, width, generator=gen).to(device)


@contextmanager
def implicit_backward(model: nn.Module) -> Iterator[None]:
    """Every equilibrium layer of ``model`` uses the implicit backward within the block."""
    layers = [m for m in model.modules() if isinstance(m, contdeq.DEQ)]
    saved = [layer.backward_mode for layer in layers]
    try:
        for layer in layers:
            layer.backward_mode = contdeq.Implicit()
        yield
    finally:
        for layer, mode in zip(layers, saved, strict=True):
            layer.backward_mode = mode


# -- the paper benchmark's tasks ------------------------------------------------------------
CAP = 0.9


class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + x)`` with ``||W||_2 <= 0.9``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = contdeq.spectral_norm_cap(nn.Linear(width, width), cap=CAP)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.linear(z) + x)


class ConvCell(nn.Module):
    """``f(z, x) = tanh(conv(z) + x)`` with the 3x3 conv's operator norm ``<= 0.9``: the kernel
    reshaped to ``(C_out, C_in * 9)`` is capped at ``0.9 / 3`` (the convolution's operator norm
    can be up to ``sqrt(3 * 3)`` times that of the reshaped kernel)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = contdeq.spectral_norm_cap(
            nn.Conv2d(channels, channels, 3, padding=1), cap=CAP / 3)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.conv(z) + x)


class MultiScaleConvCell(nn.Module):
    """Two-scale ``f((z0, z1), x)``, a contraction of the joint state (Lipschitz ``<= 0.9``).

    ``z0' = tanh(conv(z0) + up(z1) + inj0(x))``, ``z1' = tanh(conv(z1) + down(z0) + inj1(x))``
    with ``up`` a 1x1 conv, nearest upsampling by 2 and a factor 1/2 (upsampling alone has
    operator norm 2) and ``down`` a strided 3x3 conv. Each of the four state-to-state maps is
    capped at operator norm ``0.45`` (reshaped kernels at ``0.45 / 3`` for the 3x3 convs,
    ``0.45 / 2`` for the strided one: each input pixel meets at most 4 of its windows), so the
    2x2 block operator has norm ``<= 0.9``. contdeq's :class:`~contdeq.MultiScaleCell` (MDEQ's
    GroupNorm block) is not a contraction; the ODE solves of this benchmark need one.
    """

    def __init__(self, channels: int, injection_channels: int) -> None:
        super().__init__()
        c0, c1 = channels, 2 * channels

        def capped(conv: nn.Conv2d, factor: float) -> nn.Conv2d:
            return contdeq.spectral_norm_cap(conv, cap=CAP / 2 / factor)

        self.same0 = capped(nn.Conv2d(c0, c0, 3, padding=1), 3)
        self.same1 = capped(nn.Conv2d(c1, c1, 3, padding=1), 3)
        self.down = capped(nn.Conv2d(c0, c1, 3, stride=2, padding=1), 2)
        self.up = capped(nn.Conv2d(c1, c0, 1), 1)
        self.inject0 = nn.Conv2d(injection_channels, c0, 3, padding=1)
        self.inject1 = nn.Conv2d(injection_channels, c1, 3, stride=2, padding=1)

    def state_shapes(self, size: int) -> tuple[tuple[int, int, int], ...]:
        """Per-sample shapes of the two scales for ``size x size`` inputs."""
        return ((self.same0.in_channels, size, size),
                (self.same1.in_channels, size // 2, size // 2))

    def forward(self, zs: tuple[Tensor, ...], x: Tensor) -> tuple[Tensor, Tensor]:
        z0, z1 = zs
        up = 0.5 * F.interpolate(self.up(z1), scale_factor=2, mode="nearest")
        return (torch.tanh(self.same0(z0) + up + self.inject0(x)),
                torch.tanh(self.same1(z1) + self.down(z0) + self.inject1(x)))


class PoolHead(nn.Module):
    """Global average pool of each scale, concatenated, then a linear classifier."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * channels, classes)

    def forward(self, zs: tuple[Tensor, ...]) -> Tensor:
        return self.linear(torch.cat([z.mean(dim=(2, 3)) for z in zs], dim=1))


class ScalePredictor(nn.Module):
    """SkipDEQ predictor of the two-scale state: ``(tanh(conv(x)), tanh(strided conv(x)))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fine = nn.Conv2d(channels, channels, 3, padding=1)
        self.coarse = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tanh(self.fine(x)), torch.tanh(self.coarse(x))


@dataclass
class Task:
    """A data set and the modules around the equilibrium layer. ``encoder``, ``f``, ``head``
    and ``predictor`` are factories of fresh modules; the caller seeds torch before calling
    them so every model of a task starts from the same weights."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    encoder: Callable[[], nn.Module]
    f: Callable[[], nn.Module]
    head: Callable[[], nn.Module]
    predictor: Callable[[], nn.Module]
    description: str
    #: Per-sample shapes of a multi-scale state (``None``: a single tensor state).
    state_shapes: tuple[tuple[int, ...], ...] | None = None
    #: The model whose final accuracy sets the target.
    reference: str = "NeuralODE"


def make_spirals(n: int, arms: int = 3, turns: float = 1.0, dim: int = 16, scale: float = 4.0,
                 noise: float = 0.04, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` points of ``arms`` interleaved spirals in a random plane of ``R^dim``: radius
    growing linearly along each arm from ``0.15 * scale`` to ``scale``, Gaussian noise of std
    ``noise`` in all directions; labels are the arm indices. Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(arms, (n,), generator=g)
    t = torch.rand(n, generator=g)
    radius = 0.15 + 0.85 * t
    angle = 2 * math.pi * (turns * t + label / arms)
    plane = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    basis = torch.linalg.qr(torch.randn(dim, 2, generator=g))[0]
    x = scale * plane @ basis.T + noise * torch.randn(n, dim, generator=g)
    return x, label


TASKS = ("digits-mlp", "spirals", "digits-conv", "images-multiscale")


def load_task(name: str, width: int, n_train: int | None = None, n_test: int | None = None,
              device: torch.device | str = "cpu") -> Task:
    """Task ``name`` (:data:`TASKS`) with layer width ``width`` (channels for the conv tasks);
    ``n_train`` / ``n_test`` truncate the splits (reduced runs)."""
    if name in ("digits-mlp", "digits-conv"):
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target)
        if name == "digits-conv":
            x = x.reshape(-1, 1, 8, 8)
    elif name == "spirals":
        x, y = make_spirals(3000)
    elif name == "images-multiscale":
        x, y = procedural_images(3000, 16, classes=4, seed=0)
    else:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = perm[:round(0.3 * len(x))], perm[round(0.3 * len(x)):]
    xtr, ytr = x[train][:n_train].to(device), y[train][:n_train].to(device)
    xte, yte = x[test][:n_test].to(device), y[test][:n_test].to(device)
    w = width
    if name == "images-multiscale":
        return Task(name, xtr, ytr, xte, yte, encoder=lambda: nn.Conv2d(1, w, 3, padding=1),
                    f=lambda: MultiScaleConvCell(w, w), head=lambda: PoolHead(w, 4),
                    predictor=lambda: ScalePredictor(w),
                    description=f"procedural 16x16 images, 4 classes, two scales ({w}x16x16, "
                                f"{2 * w}x8x8)",
                    state_shapes=((w, 16, 16), (2 * w, 8, 8)), reference="MS NeuralODE")
    if name == "digits-conv":
        return Task(name, xtr, ytr, xte, yte, encoder=lambda: nn.Conv2d(1, w, 3, padding=1),
                    f=lambda: ConvCell(w),
                    head=lambda: nn.Sequential(nn.Flatten(), nn.Linear(64 * w, 10)),
                    predictor=lambda: nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.Tanh()),
                    description=f"digits as 1x8x8 images, conv f with {w} channels")
    n_in, n_out = x.shape[1], int(y.max()) + 1
    desc = ("digits, MLP" if name == "digits-mlp"
            else f"{n_out}-arm spirals in R^{n_in} (procedural)") + f", width {w}"
    return Task(name, xtr, ytr, xte, yte, encoder=lambda: nn.Linear(n_in, w),
                f=lambda: TanhCell(w), head=lambda: nn.Linear(w, n_out),
                predictor=lambda: nn.Sequential(nn.Linear(w, w), nn.Tanh()), description=desc)


# -- the paper benchmark's models -----------------------------------------------------------
#: Shared tolerances: forward ``atol = rtol = 5e-3`` (DeepEquilibriumNetworks.jl's MNIST
#: setting), the ODE integrators (the DEQ's and the NeuralODE's) 10x tighter, backward 5e-3,
#: caps of 1000 ODE steps / 100 fixed-point iterations / 100 backward iterations.
TOL: dict[str, float] = {"tol": 5e-3, "ode_tol": 5e-4, "backward_rtol": 5e-3,
                         "ode_max_steps": 1000, "fp_max_steps": 100, "backward_max_steps": 100}


def set_tolerance(tol: float) -> None:
    """Set the shared steady-state / fixed-point and backward tolerance to ``tol``; the ODE
    integrators (the DEQ's and the NeuralODE's) run 10x tighter."""
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    TOL.update(tol=tol, ode_tol=tol / 10, backward_rtol=tol)


def has_torchdeq() -> bool:
    """Whether the benchmark-only extra ``torchdeq`` can be imported."""
    try:
        import torchdeq  # noqa: F401
    except ImportError:
        return False
    return True


class TorchDEQLayer(nn.Module):
    """torchdeq's DEQ around ``f(z, x)``, counting forward f calls and backward VJPs. Advances
    ``f``'s spectral-norm cap once per training forward and caches the capped weight over the
    solve, as the contdeq layers do (the cache is filled with autograd on, so the 1-step / IFT
    gradient reaches the weight)."""

    def __init__(self, f: nn.Module, **config: Any) -> None:
        super().__init__()
        from torchdeq import get_deq

        self.f = f
        self.deq = get_deq(**config)
        self.ift = bool(config.get("ift", False))
        self.forward_nfe = 0
        self.backward_vjps = 0

    def _count_vjp(self, grad: Tensor) -> None:
        self.backward_vjps += 1

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            contdeq.update_normalization(self.f)
        self.forward_nfe = self.backward_vjps = 0

        def func(z: Tensor) -> Tensor:
            out = self.f(z, x)
            if torch.is_grad_enabled() and out.requires_grad:
                out.register_hook(self._count_vjp)
            else:
                self.forward_nfe += 1
            return out

        with parametrize.cached():
            for sub in self.f.modules():  # read once, so parametrize.cached() keeps its graph
                if parametrize.is_parametrized(sub):
                    for name in sub.parametrizations:
                        getattr(sub, name)
            z_out, _ = self.deq(func, torch.zeros_like(x))
        if self.training:
            self.forward_nfe += 1  # the graph-building call of the gradient
        return z_out[-1]

    def counts(self) -> tuple[int, int | None]:
        """Forward NFE and backward linear-solve VJPs of the last step (0 without IFT)."""
        return self.forward_nfe, max(self.backward_vjps - 1, 0) if self.ift else 0


class Net(nn.Module):
    """``encoder -> layer -> head``."""

    def __init__(self, encoder: nn.Module, layer: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.layer, self.head = encoder, layer, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(self.encoder(x)))


def _shared_options(solver: str) -> dict[str, Any]:
    """The shared tolerances and caps of a contdeq equilibrium layer, read from :data:`TOL` when
    the model is built."""
    return {"solver": solver, "atol": TOL["tol"], "rtol": TOL["tol"],
            "max_steps": TOL["ode_max_steps"] if solver == "ode" else TOL["fp_max_steps"],
            "backward_rtol": TOL["backward_rtol"], "backward_max_steps": TOL["backward_max_steps"],
            "on_nonconvergence": "ignore"}


def _deq(solver: str, backward: str = "implicit", kind: type = contdeq.DEQ, **kw: Any
         ) -> Callable[..., nn.Module]:
    """A factory ``(f, predictor_factory[, state_shapes]) -> layer`` of ``kind`` (a DEQ, a skip
    DEQ or their multi-scale versions)."""
    def make(f: nn.Module, predictor: Callable[[], nn.Module], *shapes: Any) -> nn.Module:
        skip = kind in (contdeq.SkipDEQ, contdeq.MultiScaleSkipDEQ)
        args = (f, predictor()) if skip else (f,)
        # Rows without a method are dopri5's (the layers' default before it became ptc).
        method = {"method": "dopri5"} if solver == "ode" and "method" not in kw else {}
        ms = {"state_shapes": shapes[0]} if shapes else {}
        return kind(*args, backward=backward, **ms, **_shared_options(solver), **method, **kw)
    return make


def _node(adjoint: bool = False, compile: bool = False) -> Callable[..., nn.Module]:
    def make(f: nn.Module, predictor: Callable[[], nn.Module], *shapes: Any) -> nn.Module:
        if shapes:
            return contdeq.MultiScaleNeuralODE(f, state_shapes=shapes[0], rtol=TOL["ode_tol"],
                                               atol=TOL["ode_tol"])
        return contdeq.NeuralODE(f, adjoint=adjoint, rtol=TOL["ode_tol"], atol=TOL["ode_tol"],
                                 compile=compile)
    return make


def _torchdeq(ift: bool) -> Callable[..., nn.Module]:
    def make(f: nn.Module, predictor: Callable[[], nn.Module]) -> nn.Module:
        if not ift:
            return TorchDEQLayer(f)
        return TorchDEQLayer(f, ift=True, f_stop_mode="rel", b_stop_mode="rel",
                             f_tol=TOL["tol"], b_tol=TOL["backward_rtol"],
                             f_max_iter=TOL["fp_max_steps"], b_max_iter=TOL["backward_max_steps"])
    return make


#: The skip term of Pal et al. (2022) / DeepEquilibriumNetworks.jl's MNIST experiments.
PAPER_SKIP_LOSS: dict[str, Any] = {"skip_weight": 5.0, "skip_norm": "l1", "skip_detach": False}
#: Depths and mask sparsities of the weight-tied rows (sparsity 0: no masks).
WEIGHT_TIED_DEPTHS = (4, 8, 16)
WEIGHT_TIED_SPARSITIES = (0.0, 0.5, 0.8)


def weight_tied_name(depth: int, sparsity: float, multiscale: bool = False) -> str:
    """``"WeightTied(8)"``, ``"WeightTied(8) masks 0.5"``, ``"MS WeightTied(8) masks 0.8"``."""
    masks = f" masks {sparsity:g}" if sparsity else ""
    return f"{'MS ' if multiscale else ''}WeightTied({depth}){masks}"


def _weight_tied(depth: int, sparsity: float, multiscale: bool = False
                 ) -> Callable[..., nn.Module]:
    """A weight-tied layer factory; the masks' seed is drawn from torch's generator, which
    :func:`build_model` has seeded, so each training seed gets its own reproducible masks."""
    options = {"masks": "distinct", "sparsity": sparsity} if sparsity else {}

    def make(f: nn.Module, predictor: Callable[[], nn.Module], *shapes: Any) -> nn.Module:
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        if multiscale:
            return contdeq.MultiScaleWeightTied(f, depth, state_shapes=shapes[0], seed=seed,
                                                **options)
        return contdeq.WeightTied(f, depth, seed=seed, **options)
    return make


def _weight_tied_rows(multiscale: bool) -> dict[str, Callable[..., nn.Module]]:
    return {weight_tied_name(d, s, multiscale): _weight_tied(d, s, multiscale)
            for d in WEIGHT_TIED_DEPTHS for s in WEIGHT_TIED_SPARSITIES}


_SKIP, _SKIPREG = contdeq.SkipDEQ, contdeq.SkipRegDEQ
#: Model name -> factory ``(f, predictor_factory) -> layer``. Skip rows use the library's skip
#: term (``skip_weight=1``, L2, stop-gradient at ``z*``), ``paper loss`` rows the paper's
#: (``5 * mean|z0 - z*|`` with the gradient reaching ``z*``). ``WeightTied(d)`` rows apply
#: the same ``f`` ``d`` times (``masks s``: a distinct random mask per application zeroing the
#: fraction ``s`` of every weight). NeuralODE (backprop) comes first: it defines the target.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "NeuralODE": _node(),
    "NeuralODE adjoint": _node(adjoint=True),
    "NeuralODE compiled": _node(compile=True),
    "DEQ(ode, dopri5)": _deq("ode"),
    "DEQ(ode, dopri5) unrolled": _deq("ode", "unrolled"),
    "DEQ(ode, ptc)": _deq("ode", method="ptc"),
    "DEQ(ode, ptc) jfb": _deq("ode", "jfb", method="ptc"),
    "DEQ(ode, ptc) compiled": _deq("ode", method="ptc", compile=True),
    "DEQ(ode, ptc) compiled, 4 steps per call": _deq(
        "ode", method=contdeq.solvers.PTC(steps_per_call=4), compile=True),
    **{f"DEQ({s}){j}": _deq(s, b) for s in ("anderson", "broyden", "picard")
       for j, b in (("", "implicit"), (" jfb", "jfb"))},
    "SkipDEQ(ode, dopri5)": _deq("ode", kind=_SKIP),
    "SkipRegDEQ(ode, dopri5)": _deq("ode", kind=_SKIPREG),
    "SkipDEQ(ode, ptc)": _deq("ode", kind=_SKIP, method="ptc"),
    "SkipRegDEQ(ode, ptc)": _deq("ode", kind=_SKIPREG, method="ptc"),
    "SkipDEQ(ode, dopri5) paper loss": _deq("ode", kind=_SKIP, **PAPER_SKIP_LOSS),
    "SkipRegDEQ(ode, dopri5) paper loss": _deq("ode", kind=_SKIPREG, **PAPER_SKIP_LOSS),
    "SkipDEQ(ode, ptc) paper loss": _deq("ode", kind=_SKIP, method="ptc", **PAPER_SKIP_LOSS),
    "SkipRegDEQ(ode, ptc) paper loss": _deq("ode", kind=_SKIPREG, method="ptc",
                                            **PAPER_SKIP_LOSS),
    "torchdeq default": _torchdeq(ift=False),
    "torchdeq IFT": _torchdeq(ift=True),
    **_weight_tied_rows(multiscale=False),
}
_MS, _MSSKIP, _MSSKIPREG = (contdeq.MultiScaleDEQ, contdeq.MultiScaleSkipDEQ,
                            contdeq.MultiScaleSkipRegDEQ)
#: Multi-scale models (tasks with ``state_shapes``), factories ``(f, predictor, state_shapes)
#: -> layer``; "MS NeuralODE" is their reference.
MULTISCALE_MODELS: dict[str, Callable[..., nn.Module]] = {
    "MS NeuralODE": _node(),
    "MS DEQ(ode, dopri5)": _deq("ode", kind=_MS),
    "MS DEQ(ode, ptc)": _deq("ode", kind=_MS, method="ptc"),
    "MS DEQ(ode, ptc) jfb": _deq("ode", "jfb", kind=_MS, method="ptc"),
    "MS DEQ(anderson)": _deq("anderson", kind=_MS),
    "MS SkipDEQ(ode, ptc)": _deq("ode", kind=_MSSKIP, method="ptc"),
    "MS SkipRegDEQ(ode, ptc)": _deq("ode", kind=_MSSKIPREG, method="ptc"),
    "MS SkipRegDEQ(ode, dopri5) paper loss": _deq("ode", kind=_MSSKIPREG, **PAPER_SKIP_LOSS),
    "MS SkipDEQ(ode, ptc) paper loss": _deq("ode", kind=_MSSKIP, method="ptc",
                                            **PAPER_SKIP_LOSS),
    "MS SkipRegDEQ(ode, ptc) paper loss": _deq("ode", kind=_MSSKIPREG, method="ptc",
                                               **PAPER_SKIP_LOSS),
    **_weight_tied_rows(multiscale=True),
}
#: The weight-tied rows (single- and multi-scale); ``benchmarks/weight_tied.py`` runs them.
WEIGHT_TIED_MODELS = tuple(n for n in (*MODELS, *MULTISCALE_MODELS) if "WeightTied(" in n)
#: Rows whose layer runs compiled (``compile=True``): the DEQ's ptc steps (one per compiled
#: call, the default, or 4), the NeuralODE's f.
COMPILED_MODELS = ("NeuralODE compiled", "DEQ(ode, ptc) compiled",
                   "DEQ(ode, ptc) compiled, 4 steps per call")
#: Registered but left out of the paper benchmark's default run (the dopri5 skip rows: slow,
#: and the ptc rows answer the same question; the unrolled backward: ``results/layers.*``; the
#: weight-tied rows: ``weight_tied.py``; the compiled rows: their warm-up, ``compile.py``):
#: run them with ``--models``.
OPTIONAL_MODELS = ("SkipDEQ(ode, dopri5)", "SkipRegDEQ(ode, dopri5)",
                   "DEQ(ode, dopri5) unrolled", *WEIGHT_TIED_MODELS, *COMPILED_MODELS)


#: Infix of a row trained under ``torch.autocast``: ``"DEQ(ode, ptc) autocast bfloat16"``.
AUTOCAST = " autocast "


def models_for(task: Task, names: Any) -> list[str]:
    """The names among ``names`` that apply to ``task`` (multi-scale or not)."""
    registry = MULTISCALE_MODELS if task.state_shapes is not None else MODELS
    return [n for n in names if n.partition(AUTOCAST)[0] in registry]


def build_model(name: str, task: Task, seed: int) -> Net:
    """Model ``name`` for ``task`` (on a multi-scale task, ``"DEQ(ode, ptc)"`` names its ``"MS
    DEQ(ode, ptc)"``); encoder, ``f`` and head get the same weights for every name (seeded
    before they are built; a SkipDEQ predictor is built after them)."""
    torch.manual_seed(seed)
    encoder, f, head = task.encoder(), task.f(), task.head()
    torch.manual_seed(seed + 1)
    if task.state_shapes is not None:
        name = name if name.startswith("MS ") else f"MS {name}"
        layer = MULTISCALE_MODELS[name](f, task.predictor, task.state_shapes)
    else:
        layer = MODELS[name](f, task.predictor)
    return Net(encoder, layer, head).to(task.x_train.device)


def layer_counts(layer: nn.Module) -> tuple[int, int | None]:
    """Forward NFE and backward iterations of the layer's last training step. Backward
    iterations: VJPs of the implicit linear solve (0 for jfb / torchdeq's 1-step gradient), f
    calls of the adjoint ODE, ``None`` for backprop through the solver (NeuralODE)."""
    if isinstance(layer, TorchDEQLayer):
        return layer.counts()
    stats = layer.stats
    if stats is None:
        return 0, None
    if stats.backward is not None:
        return stats.forward.nfe, stats.backward.nfe
    if isinstance(layer, contdeq.DEQ) and isinstance(layer.backward_mode, contdeq.JFB):
        return stats.forward.nfe, 0
    return stats.forward.nfe, None


# -- the paper benchmark's training ---------------------------------------------------------
@dataclass
class Config:
    """Training settings shared by every model."""

    name: str = "paper"
    epochs: int = 20
    batch: int = 64
    lr: float = 2e-3
    width: dict[str, int] = field(
        default_factory=lambda: {"digits-mlp": 64, "spirals": 64, "digits-conv": 8,
                                 "images-multiscale": 8})
    n_train: int | None = None
    n_test: int | None = None
    seeds: tuple[int, ...] = (0, 1)
    tasks: tuple[str, ...] = TASKS
    models: tuple[str, ...] = ()
    threads: int | None = None


PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "quick": {"name": "paper_quick", "epochs": 4, "batch": 64, "n_train": 768, "n_test": 256,
              "seeds": (0,), "threads": 1,
              "width": {"digits-mlp": 32, "spirals": 32, "digits-conv": 4,
                        "images-multiscale": 4}},
    "smoke": {"name": "paper_smoke", "epochs": 2, "batch": 32, "n_train": 64, "n_test": 32,
              "seeds": (0,), "threads": 1,
              "width": {"digits-mlp": 8, "spirals": 8, "digits-conv": 2,
                        "images-multiscale": 2}},
}


def f_call_time(task: Task, batch: int, seed: int) -> float:
    """Seconds of one ``f(z, x)`` call at the training batch size (weights cached, no grad)."""
    torch.manual_seed(seed)
    encoder, f = task.encoder().to(task.x_train.device), task.f().to(task.x_train.device)
    with torch.no_grad(), parametrize.cached():
        x = encoder(task.x_train[:batch])
        z = (torch.tanh(x) if task.state_shapes is None
             else tuple(x.new_zeros(len(x), *s) for s in task.state_shapes))
        return time_min(lambda: f(z, x), repeats=20)


def evaluate(model: nn.Module, task: Task, batch: int) -> tuple[float, float, float]:
    """Test accuracy (%), inference seconds over the test set, mean forward NFE per batch."""
    model.eval()
    device = task.x_test.device
    correct, seconds, nfes = 0, 0.0, []
    with torch.no_grad():
        for i in range(0, len(task.x_test), batch):
            xb, yb = task.x_test[i:i + batch], task.y_test[i:i + batch]
            synchronize(device)
            start = time.perf_counter()
            logits = model(xb)
            synchronize(device)
            seconds += time.perf_counter() - start
            correct += int((logits.argmax(1) == yb).sum())
            nfes.append(layer_counts(model.layer)[0])
    return 100.0 * correct / len(task.x_test), seconds, sum(nfes) / len(nfes)


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> Tensor:
    """The shuffled order of ``n`` training samples in ``epoch`` of ``seed``: the same for
    every model, so all see the same batches."""
    g = torch.Generator().manual_seed(100_003 * seed + epoch)
    return torch.randperm(n, generator=g).to(device)


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, task: Task, batch: int,
                seed: int, epoch: int, cast: Callable[[], Any] | None = None,
                graph: bool = True) -> dict[str, float]:
    """One epoch of :func:`timed_step` steps; training time excludes batch selection and memory
    bookkeeping only. ``cast``: a context factory for the forward and the loss (``backward()``
    and the optimizer step run outside it, PyTorch's autocast recipe).

    The autograd graph's size (``graph``) is measured after the timed steps, by one more
    forward on the epoch's first batch with saved-tensor hooks (the hooks cost a Python call per
    saved tensor: inside the timed steps they would slow the models that save many)."""
    model.train()
    device = task.x_train.device
    perm = epoch_order(len(task.x_train), seed, epoch, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps = [timed_step(model, opt, task.x_train[idx], task.y_train[idx], cast=cast)
             for idx in perm.split(batch)]
    bwd = [math.nan if s["backward_iterations"] is None else s["backward_iterations"]
           for s in steps]
    record = {"train_s": sum(s["step"] for s in steps), "batches": len(steps),
              "forward_nfe": statistics.fmean(s["forward_nfe"] for s in steps),
              "backward_iterations": statistics.fmean(bwd),
              # the profile of a step (``paper.py --profile``): medians over the epoch
              **{f"{k}_ms": 1e3 * statistics.median(s[k] for s in steps) for k in PARTS},
              "median_forward_nfe": statistics.median(s["forward_nfe"] for s in steps),
              "median_backward_iterations": statistics.median(
                  s["backward_iterations"] or 0 for s in steps)}
    saved = SavedTensors()
    if graph:
        with saved.record():  # a training forward: a spectral cap takes one more step
            model(task.x_train[perm[:batch]])
    record.update(graph_mb=saved.megabytes if graph else math.nan,
                  peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else math.nan)
    return record


#: The parts of :func:`timed_step`'s step (``paper.py --profile`` tabulates their medians).
PARTS = ("step", "forward_solve", "forward_rest", "backward_solve", "backward_rest", "optimizer")


def timed_step(model: Net, opt: torch.optim.Optimizer, xb: Tensor, yb: Tensor,
               run: nn.Module | None = None, cast: Callable[[], Any] | None = None
               ) -> dict[str, Any]:
    """One training step of ``run`` (default ``model``; e.g. its ``torch.compile`` wrapper),
    the forward and the loss inside ``cast()`` if given: wall seconds of the step and of its
    :data:`PARTS` (the solves' own ``stats.wall_time``; on a GPU synchronized at the parts'
    boundaries, and the solvers synchronize at every convergence test), this thread's CPU
    seconds, the loss, and the layer's forward NFE and backward iterations
    (:func:`layer_counts`)."""
    device = xb.device
    synchronize(device)
    start, cpu = time.perf_counter(), time.thread_time()
    with cast() if cast is not None else nullcontext():
        logits = (model if run is None else run)(xb)
        loss = nn.functional.cross_entropy(logits, yb) + contdeq.aux_loss(model)
    synchronize(device)
    forward = time.perf_counter()
    opt.zero_grad()
    loss.backward()
    synchronize(device)
    backward = time.perf_counter()
    opt.step()
    synchronize(device)
    end, cpu = time.perf_counter(), time.thread_time() - cpu
    stats = getattr(model.layer, "stats", None)
    fwd_solve = 0.0 if stats is None else stats.forward.wall_time
    bwd_solve = 0.0 if stats is None or stats.backward is None else stats.backward.wall_time
    nfe, iters = layer_counts(model.layer)
    return {"step": end - start, "forward_solve": fwd_solve,
            "forward_rest": forward - start - fwd_solve, "backward_solve": bwd_solve,
            "backward_rest": backward - forward - bwd_solve, "optimizer": end - backward,
            "cpu": cpu, "loss": float(loss.detach()), "forward_nfe": nfe,
            "backward_iterations": iters}


def warm_up(model: nn.Module, task: Task, batch: int) -> float:
    """Compile a model's graphs before training: a training forward and backward for every
    training batch size (full and last), an evaluation forward for every test batch size,
    weights and buffers restored afterwards (so its training matches the eager twin's);
    returns the seconds taken (not training time)."""
    state = copy.deepcopy(model.state_dict())
    start = time.perf_counter()
    model.train()
    for size in {min(batch, len(task.x_train)), len(task.x_train) % batch} - {0}:
        xb, yb = task.x_train[:size], task.y_train[:size]
        (nn.functional.cross_entropy(model(xb), yb) + contdeq.aux_loss(model)).backward()
    model.eval()
    with torch.no_grad():
        for size in {min(batch, len(task.x_test)), len(task.x_test) % batch} - {0}:
            model(task.x_test[:size])
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    model.train()
    return seconds


class Cell:
    """One model of one task and seed in training: model, optimizer, per-epoch history
    (resumable per epoch from ``checkpoint_dir``). A compiled row (:data:`COMPILED_MODELS`) is
    warmed up first (:func:`warm_up`; ``warmup_s``). A row ``"<model> autocast <dtype>"``
    (:data:`AUTOCAST`) runs the forward, the loss and evaluation under ``torch.autocast`` to
    that dtype, and measures no graph."""

    def __init__(self, task: Task, name: str, cfg: Config, seed: int,
                 checkpoint_dir: Path | None = None, resume: bool = False) -> None:
        self.task, self.name, self.cfg, self.seed = task, name, cfg, seed
        base, _, dtype = name.partition(AUTOCAST)
        self.autocast = getattr(torch, dtype) if dtype else None
        self.model = build_model(base, task, seed)
        self.warmup_s = warm_up(self.model, task, cfg.batch) if name in COMPILED_MODELS else 0.0
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.history: list[dict[str, float]] = []
        self.path = None
        if checkpoint_dir is not None:
            slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
            self.path = checkpoint_dir / task.name / f"{slug}_s{seed}.pt"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume and self.path.is_file():
                self.history = list(
                    contdeq.load_checkpoint(self.path, self.model, self.opt).extra["history"])

    def train_epoch(self) -> None:
        """Train and evaluate the next epoch (nothing once ``cfg.epochs`` are done)."""
        epoch = len(self.history)
        if epoch >= self.cfg.epochs:
            return
        cast = None if self.autocast is None else (
            lambda: torch.autocast(self.task.x_train.device.type, dtype=self.autocast))
        record = train_epoch(self.model, self.opt, self.task, self.cfg.batch, self.seed, epoch,
                             cast, graph=cast is None)
        with cast() if cast is not None else nullcontext():
            acc, infer_s, infer_nfe = evaluate(self.model, self.task, self.cfg.batch)
        record.update(epoch=epoch, test_acc=acc, infer_s=infer_s, infer_nfe=infer_nfe)
        self.history.append(record)
        if self.path is not None:
            contdeq.save_checkpoint(self.path, self.model, self.opt, epoch=epoch,
                                    extra={"history": self.history})


def train_cells(task: Task, cells: dict[Any, Cell], epochs: int, seed: int, notes: list[str],
                after_epoch: Callable[[Any], None] | None = None
                ) -> dict[Any, list[dict[str, float]]]:
    """Train ``cells`` epoch by epoch in turn (epoch 0 of each, then epoch 1 of each, ...), so
    a drift in the machine's speed over the run reaches every model alike; ``after_epoch(key)``
    after each cell's epoch. A cell that fails is noted and dropped; the others go on. Returns
    the histories."""
    # a progress bar on a terminal only (tqdm's disable=None): logs, CI and tests get none
    with tqdm(total=epochs * len(cells), desc=f"{task.name} seed {seed}", disable=None,
              leave=False, dynamic_ncols=True) as bar:
        for _ in range(epochs):
            for key, cell in list(cells.items()):
                bar.set_postfix_str(cell.name)
                try:
                    cell.train_epoch()
                except Exception as exc:  # a diverging model must not stop the suite
                    notes.append(f"FAILED {task.name} / {cell.name}: {type(exc).__name__}: {exc}")
                    print(notes[-1], flush=True)
                    del cells[key]
                else:
                    if after_epoch is not None:
                        after_epoch(key)
                bar.update()
    return {key: cell.history for key, cell in cells.items()}


def train_interleaved(task: Task, names: list[str], cfg: Config, seed: int,
                      checkpoint_dir: Path | None, resume: bool, notes: list[str]
                      ) -> dict[str, list[dict[str, float]]]:
    """Train every model of ``names`` on ``task`` interleaved (:func:`train_cells`); a model
    that cannot be built is noted and left out. Returns the histories."""
    cells: dict[str, Cell] = {}
    for name in names:
        try:
            cells[name] = Cell(task, name, cfg, seed, checkpoint_dir, resume)
        except Exception as exc:  # a model that cannot be built must not stop the suite
            notes.append(f"FAILED {task.name} / {name}: {type(exc).__name__}: {exc}")
            print(notes[-1], flush=True)
    notes += [f"{task.name} seed {seed}: warm-up (compilation) of {name}: {cell.warmup_s:.1f} s, "
              "not counted in training time" for name, cell in cells.items() if cell.warmup_s]
    histories = train_cells(task, cells, cfg.epochs, seed, notes)
    for name, hist in histories.items():
        h = hist[-1]
        print(f"{task.name:12s} seed {seed} {name:20s} acc={h['test_acc']:5.1f}% "
              f"nfe={h['forward_nfe']:6.1f} (trained {sum(r['train_s'] for r in hist):.1f} s)",
              flush=True)
    return histories


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def aggregate(histories: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Per-epoch means over seeds (maxima for memory)."""
    out = []
    for epoch_records in zip(*histories, strict=True):
        rec = {k: _mean([r[k] for r in epoch_records]) for k in epoch_records[0]}
        rec["graph_mb"] = max(r["graph_mb"] for r in epoch_records)
        out.append(rec)
    return out


def time_to_target(history: list[dict[str, float]], target: float | None) -> float | None:
    """Cumulative training time at the first epoch whose test accuracy reaches ``target``."""
    elapsed = 0.0
    for rec in history:
        elapsed += rec["train_s"]
        if target is not None and rec["test_acc"] >= target:
            return elapsed
    return None


def skip_baseline(model: str) -> str | None:
    """The DEQ(ode) row a skip row is compared with (same ODE method, same multi-scale-ness):
    ``"MS SkipRegDEQ(ode, ptc) paper loss"`` -> ``"MS DEQ(ode, ptc)"``; ``None`` if not a skip
    row."""
    match = re.match(r"(MS )?Skip(?:Reg)?DEQ\(ode, (\w+)\)", model)
    return None if match is None else f"{match.group(1) or ''}DEQ(ode, {match.group(2)})"


def summarize(task: Task, histories: dict[str, list[dict[str, float]]], t_f: float
              ) -> list[dict[str, Any]]:
    """One row per model, with the target accuracy, time to it, overhead and the ratios (against
    the NeuralODE, torchdeq's best configuration and a skip row's DEQ(ode))."""
    ref = task.reference
    target = histories[ref][-1]["test_acc"] - 0.5 if ref in histories else None
    rows = []
    for name, hist in histories.items():
        per_epoch = _mean([r["train_s"] for r in hist])
        fwd = _mean([r["forward_nfe"] for r in hist])
        bwd = _mean([r["backward_iterations"] for r in hist])
        calls = fwd + (0.0 if math.isnan(bwd) else bwd)
        peak = max(r["peak_cuda_mb"] for r in hist)
        rows.append({
            "task": task.name, "model": name, "target_acc": target,
            "s_per_epoch": per_epoch, "time_to_target_s": time_to_target(hist, target),
            "forward_nfe": fwd, "backward_iterations": None if math.isnan(bwd) else bwd,
            "final_acc": hist[-1]["test_acc"], "infer_ms": 1e3 * hist[-1]["infer_s"],
            "infer_nfe": hist[-1]["infer_nfe"], "graph_mb": max(r["graph_mb"] for r in hist),
            "peak_cuda_mb": None if math.isnan(peak) else peak, "f_call_ms": 1e3 * t_f,
            "overhead": per_epoch / hist[0]["batches"] / (calls * t_f) if calls else None,
            "history": hist,
        })
    by_name = {r["model"]: r for r in rows}
    node = by_name.get(ref)
    tdeq = [r for r in rows if r["model"].startswith("torchdeq")]
    reached = [r for r in tdeq if r["time_to_target_s"] is not None]
    best = (min(reached, key=lambda r: r["time_to_target_s"]) if reached
            else min(tdeq, key=lambda r: r["s_per_epoch"]) if tdeq else None)
    for r in rows:
        for key, other in (("node", node), ("torchdeq", best)):
            r[f"ratio_{key}_epoch"] = ratio(r["s_per_epoch"], other and other["s_per_epoch"])
            r[f"ratio_{key}_target"] = ratio(r["time_to_target_s"],
                                             other and other["time_to_target_s"])
        r["torchdeq_best"] = None if best is None else best["model"]
        base = by_name.get(skip_baseline(r["model"]) or "")
        r["ratio_deq_target"] = ratio(r["time_to_target_s"], base and base["time_to_target_s"])
        r["ratio_deq_infer_nfe"] = ratio(r["infer_nfe"], base and base["infer_nfe"])
    return rows


def train_task(task: Task, names: list[str], cfg: Config, notes: list[str],
               checkpoint_dir: Path | None = None, resume: bool = False
               ) -> list[dict[str, Any]]:
    """Train ``names`` on ``task`` for every seed of ``cfg`` (:func:`train_interleaved`) and
    :func:`summarize` the means over seeds of the models that finished every seed."""
    t_f = f_call_time(task, cfg.batch, cfg.seeds[0])
    per_seed = [train_interleaved(task, names, cfg, seed, checkpoint_dir, resume, notes)
                for seed in cfg.seeds]
    histories = {name: aggregate([runs[name] for runs in per_seed]) for name in names
                 if all(name in runs for runs in per_seed)}
    return summarize(task, histories, t_f)
