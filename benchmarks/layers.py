"""Layer benchmark: one training step of an MLP equilibrium model on digits, per layer kind.

``python -m benchmarks.layers --help``; benchmarks/README.md describes it."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from sklearn.datasets import load_digits
from torch import nn

import contdeq

from .common import SavedTensors, TanhCell, fmt, machine_header, make_parser, table, write_results


def layer_factories(width: int) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """Each layer kind, built around a given ``f``."""
    return {
        "DEQ(ode, dopri5)": lambda f: contdeq.DEQ(f, method="dopri5"),
        "DEQ(ode, ptc)": lambda f: contdeq.DEQ(f, method="ptc"),
        "DEQ(ode, dopri5) unrolled": lambda f: contdeq.DEQ(f, method="dopri5",
                                                             backward="unrolled"),
        "DEQ(anderson)": lambda f: contdeq.DEQ(f, solver="anderson"),
        "DEQ(anderson) jfb": lambda f: contdeq.DEQ(f, solver="anderson", backward="jfb"),
        "SkipDEQ(ode)": lambda f: contdeq.SkipDEQ(
            f, nn.Sequential(nn.Linear(width, width), nn.Tanh()), method="dopri5"),
        "SkipRegDEQ(ode)": lambda f: contdeq.SkipRegDEQ(f, method="dopri5"),
        "NeuralODE": lambda f: contdeq.NeuralODE(f),
        "NeuralODE adjoint": lambda f: contdeq.NeuralODE(f, adjoint=True),
    }


def make_model(name: str, width: int, device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    f = TanhCell(width)
    layer = layer_factories(width)[name](f)
    return nn.Sequential(nn.Linear(64, width), layer, nn.Linear(width, 10)).to(device)


def measure(name: str, width: int, x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict:
    model = make_model(name, width, x.device)
    layer = model[1]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cuda = x.device.type == "cuda"
    best, saved_mb, peak_mb = float("inf"), 0.0, float("nan")
    for i in range(repeats + 1):  # the first step is a warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        saved = SavedTensors()
        # Graph memory in the untimed warm-up step only: the hooks cost a call per saved tensor.
        with saved.record() if i == 0 else nullcontext():
            loss = nn.functional.cross_entropy(model(x), y) + contdeq.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
            peak_mb = torch.cuda.max_memory_allocated() / 2**20
        if i > 0:
            best = min(best, time.perf_counter() - start)
        else:
            saved_mb = saved.megabytes
    stats = layer.stats
    return {
        "layer": name, "forward_nfe": stats.forward.nfe,
        "backward_iterations": None if stats.backward is None else stats.backward.nfe,
        "step_ms": best * 1e3, "graph_mb": saved_mb, "peak_cuda_mb": peak_mb,
    }


def to_markdown(rows: list[dict], header: str) -> str:
    cells = ((r["layer"], r["forward_nfe"], fmt(r["backward_iterations"], ""),
              f"{r['step_ms']:.1f}", f"{r['graph_mb']:.2f}", fmt(r["peak_cuda_mb"], ".1f"))
             for r in rows)
    return table("layer | forward NFE | backward iterations | step ms | graph MB | peak CUDA MB",
                 cells, "lrrrrr", [header, ""])


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    data = load_digits()
    x = torch.tensor(data.data[:args.batch], dtype=torch.float32, device=device) / 16.0
    y = torch.tensor(data.target[:args.batch], device=device)
    rows = []
    for name in layer_factories(args.width):
        rows.append(measure(name, args.width, x, y, args.repeats))
        r = rows[-1]
        print(f"{name:28s} nfe={r['forward_nfe']:4d} back={r['backward_iterations']} "
              f"step={r['step_ms']:8.1f} ms graph={r['graph_mb']:.2f} MB", flush=True)
    header = (f"One training step, MLP on digits (batch {args.batch}, width {args.width}, "
              f"default tolerances atol = rtol = 1e-4, backward tol 1e-4; {machine_header()}, "
              f"device {device})")
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    write_results(f"layers{suffix}", to_markdown(rows, header), rows, args.out)


if __name__ == "__main__":
    main()
