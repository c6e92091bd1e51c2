"""Which forward solver reaches the equilibrium soonest, with no warning, on the cells people
bring to a DEQ layer, at initialization (a researcher's first hour).

``python -m benchmarks.defaults --help``; benchmarks/README.md describes it."""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable

import torch
from torch import nn

import contdeq
from contdeq.solvers import ConvergenceWarning

from .common import (
    CPU,
    machine_header,
    make_parser,
    synchronize,
    table,
    time_min,
    write_results,
)

WIDTH, CHANNELS, SIDE, BATCH = 128, 16, 8, 64

#: Forward configurations: name -> (DEQ keyword arguments).
CONFIGS: dict[str, dict[str, object]] = {
    "ode dopri5": {"method": "dopri5"},
    "ode ptc (default)": {},
    "anderson": {"solver": "anderson"},
    "broyden": {"solver": "broyden"},
    "picard": {"solver": "picard"},
}


class TanhLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = contdeq.spectral_norm_cap(nn.Linear(WIDTH, WIDTH), cap=0.9)
        self.u = nn.Linear(WIDTH, WIDTH)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.w(z) + self.u(x))


class LayerNormCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.relu(self.w(z) + x))


class GroupNormConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.norm = nn.GroupNorm(4, CHANNELS)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.relu(self.conv(z) + x))


class ConvTanh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(z) + x)


def _dense(cell: type[nn.Module], scale: float = 1.0
           ) -> Callable[[dict], tuple[nn.Module, torch.Tensor]]:
    return lambda kw: (contdeq.DEQ(cell(), **kw), scale * torch.randn(BATCH, WIDTH))


def _conv(cell: type[nn.Module]) -> Callable[[dict], tuple[nn.Module, torch.Tensor]]:
    return lambda kw: (contdeq.DEQ(cell(), **kw), torch.randn(BATCH, CHANNELS, SIDE, SIDE))


def _multiscale(kw: dict) -> tuple[nn.Module, torch.Tensor]:
    cell = contdeq.MultiScaleCell([8, 16], 3)
    layer = contdeq.MultiScaleDEQ(cell, state_shapes=cell.state_shapes(SIDE, SIDE), **kw)
    return layer, torch.randn(BATCH, 3, SIDE, SIDE)


CELLS: dict[str, Callable[[dict], tuple[nn.Module, torch.Tensor]]] = {
    "tanh-linear cap": _dense(TanhLinear),
    "LayerNorm(relu), x ~ N(0, 1)": _dense(LayerNormCell),
    "LayerNorm(relu), x ~ 0.3 N(0, 1)": _dense(LayerNormCell, 0.3),
    "GroupNorm conv": _conv(GroupNormConv),
    "conv tanh": _conv(ConvTanh),
    "multi-scale": _multiscale,
}


def measure(cell: str, config: str, seed: int, repeats: int,
            device: torch.device = CPU) -> dict[str, object]:
    """One layer, one seed: did its forward warn, its NFE and its forward time."""
    torch.manual_seed(seed)
    layer, x = CELLS[cell](dict(CONFIGS[config]))
    layer, x = layer.to(device).eval(), x.to(device)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x)
        stats = layer.stats.forward
        warned = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        seconds = time_min(lambda: (layer(x), synchronize(device)), repeats)
    return {"cell": cell, "config": config, "seed": seed, "converged": stats.all_converged,
            "warnings": warned, "nfe": stats.nfe, "steps": stats.steps,
            "max_residual": stats.max_residual, "ms": seconds * 1e3}


class CappedLayerNormCell(LayerNormCell):
    def __init__(self, cap: float) -> None:
        super().__init__()
        contdeq.spectral_norm_cap(self.w, cap=cap)


#: What the layer's hint suggests, tried on the cell no configuration solves (seed 0):
#: name -> (cell, DEQ keyword arguments).
REMEDIES: dict[str, tuple[Callable[[], nn.Module], dict[str, object]]] = {
    "ptc, max_steps=10000": (LayerNormCell, {"method": "ptc", "max_steps": 10000}),
    "anderson, max_steps=1000": (LayerNormCell, {"solver": "anderson", "max_steps": 1000}),
    "ptc, spectral_norm_cap(W, 0.9)": (lambda: CappedLayerNormCell(0.9), {"method": "ptc"}),
    "ptc, spectral_norm_cap(W, 0.5)": (lambda: CappedLayerNormCell(0.5), {"method": "ptc"}),
}


def remedy(name: str, device: torch.device = CPU) -> dict[str, object]:
    """One remedy on ``LayerNorm(relu(W z + x))`` with ``x ~ 0.3 N(0, 1)``, seed 0."""
    make, kw = REMEDIES[name]
    torch.manual_seed(0)
    layer = contdeq.DEQ(make(), on_nonconvergence="ignore", **kw).to(device).eval()
    with torch.no_grad():
        layer(0.3 * torch.randn(BATCH, WIDTH).to(device))
    stats = layer.stats.forward
    return {"remedy": name, "converged": int(stats.converged.sum()), "batch": BATCH,
            "nfe": stats.nfe}


def grid(rows: list[dict]) -> str:
    """Markdown: a row per cell, a column per configuration (seeds converged / NFE / ms)."""
    seeds = len({r["seed"] for r in rows if "seed" in r})

    def entry(cell: str, config: str) -> str:
        mine = [r for r in rows if r.get("cell") == cell and r["config"] == config]
        return (f"{sum(r['converged'] for r in mine)}/{seeds} · "
                f"{statistics.median(r['nfe'] for r in mine):.0f} · "
                f"{statistics.median(r['ms'] for r in mine):.1f}")

    return table("cell | " + " | ".join(CONFIGS),
                 ((cell, *(entry(cell, c) for c in CONFIGS)) for cell in CELLS)).rstrip("\n")


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (fastest kept)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 timed run")
    args = parser.parse_args()
    seeds, repeats = (1, 1) if args.quick else (args.seeds, args.repeats)
    torch.set_num_threads(1)
    rows = [measure(cell, config, seed, repeats, args.device)
            for cell in CELLS for config in CONFIGS for seed in range(seeds)]
    fixes = [remedy(name, args.device) for name in REMEDIES]
    rows += fixes
    markdown = (
        "# Forward solvers on the cells people bring, at initialization\n\n"
        f"`python -m benchmarks.defaults` ({machine_header()}, batch {BATCH}, eval-mode "
        f"forward, each configuration with its default limits and atol = rtol = 1e-4). "
        f"Each entry: seeds converged without a warning / median NFE / median of the "
        f"fastest-of-{repeats} forward times in ms (a shared machine: compare within a "
        "row).\n\n" + grid(rows) + "\n\n"
        + table("remedy | converged | NFE",
                ((r["remedy"], f"{r['converged']}/{r['batch']}", r["nfe"]) for r in fixes),
                head=["What the layer's hint suggests, on `LayerNorm(relu), x ~ 0.3 N(0, 1)` "
                      "(seed 0): samples converged / NFE.", ""])
    )
    write_results("defaults" if not args.quick else "defaults_quick", markdown, rows, args.out)


if __name__ == "__main__":
    main()
