"""Weight-tied benchmark: is a DEQ better than the same ``f`` unrolled a fixed number of times?

``python -m benchmarks.weight_tied --help``; benchmarks/README.md describes it."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import contdeq

from .common import (
    RESULTS,
    TOL,
    WEIGHT_TIED_DEPTHS,
    WEIGHT_TIED_SPARSITIES,
    Config,
    build_model,
    fmt,
    load_task,
    machine_header,
    make_parser,
    mean_ci,
    models_for,
    table,
    threads,
    train_task,
    weight_tied_name,
    write_results,
)

TASKS = ("spirals", "digits-conv", "images-multiscale")
BASELINES = ("NeuralODE", "DEQ(ode, ptc)", "MS NeuralODE", "MS DEQ(ode, ptc)")
MODELS = BASELINES + tuple(weight_tied_name(d, s, ms) for ms in (False, True)
                           for d in WEIGHT_TIED_DEPTHS for s in WEIGHT_TIED_SPARSITIES)

#: Per-task overrides of :class:`paper.Config` for each preset. Full: the paper benchmark's
#: widths, batch and learning rate with fewer epochs (12), and on the multi-scale task (ten
#: times the cost of the others) 6 epochs, one seed and half the samples: 37 minutes on the
#: shared 2-core machine it was measured on, where it got a fifth of a core.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "base": {"name": "weight_tied", "threads": 1},
        "spirals": {"epochs": 12, "seeds": (0, 1)},
        "digits-conv": {"epochs": 12, "seeds": (0, 1)},
        "images-multiscale": {"epochs": 6, "seeds": (0,), "n_train": 1050, "n_test": 450},
    },
    "quick": {
        "base": {"name": "weight_tied_quick", "threads": 1, "n_train": 512, "n_test": 256,
                 "width": {"spirals": 32, "digits-conv": 4, "images-multiscale": 4}},
        "spirals": {"epochs": 4, "seeds": (0,)},
        "digits-conv": {"epochs": 4, "seeds": (0,)},
        "images-multiscale": {"epochs": 2, "seeds": (0,), "n_train": 256, "n_test": 128},
    },
    "smoke": {
        "base": {"name": "weight_tied_smoke", "threads": 1, "batch": 32, "n_train": 64,
                 "n_test": 32, "width": {"spirals": 8, "digits-conv": 2, "images-multiscale": 2}},
        "spirals": {"epochs": 2, "seeds": (0,)},
        "digits-conv": {"epochs": 2, "seeds": (0,)},
        "images-multiscale": {"epochs": 1, "seeds": (0,), "n_train": 32},
    },
}


# -- parameters --------------------------------------------------------------------------
def layer_shape(name: str) -> tuple[int | None, float]:
    """``(depth, sparsity)`` of a weight-tied row name (``(None, 0)`` for the others)."""
    for d in WEIGHT_TIED_DEPTHS:
        for s in WEIGHT_TIED_SPARSITIES:
            if name.removeprefix("MS ") == weight_tied_name(d, s):
                return d, s
    return None, 0.0


def parameter_counts(name: str, task: Any, seed: int) -> tuple[int, float]:
    """Trainable parameters of the whole model and the effective ones: for a weight-tied layer,
    the entries one application of ``f`` uses (:meth:`contdeq.WeightTied.active_parameters`)
    instead of all of ``f``'s."""
    model = build_model(name, task, seed)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layer = model.layer
    if not isinstance(layer, contdeq.WeightTied):
        return total, float(total)
    return total, total - sum(p.numel() for p in layer.f.parameters()) + layer.active_parameters()


# -- the cost of the masks ---------------------------------------------------------------
def _sparse_weight(weight: Tensor, index: Tensor, rows: int, cols: int) -> Tensor:
    """The kept entries of ``weight`` (a ``(rows, cols)`` view) as a sparse COO matrix whose
    values keep the graph to ``weight``; the masked dense weight is never formed."""
    values = weight.reshape(-1)[index[0] * cols + index[1]]
    return torch.sparse_coo_tensor(index, values, (rows, cols), check_invariants=False)


def _sparse_step(kind: str, weight: Tensor, bias: Tensor, indices: list[Tensor], x: Tensor
                 ) -> Tensor:
    """The masked weight-tied forward with sparse kernels: ``z_{k+1} = tanh(S_k z_k + b + x)``,
    ``S_k`` the kept entries of ``weight`` (conv: applied to ``unfold(z)``)."""
    z = torch.zeros_like(x)
    rows, cols = weight.shape[0], weight[0].numel()
    bias = bias if kind == "linear" else bias.view(1, -1, 1, 1)
    for index in indices:
        s = _sparse_weight(weight, index, rows, cols)
        if kind == "linear":
            out = torch.sparse.mm(s, z.t()).t()
        else:
            b, _, h, w = z.shape
            patches = F.unfold(z, 3, padding=1).permute(1, 0, 2).reshape(cols, b * h * w)
            out = torch.sparse.mm(s, patches).reshape(rows, b, h, w).permute(1, 0, 2, 3)
        z = torch.tanh(out + bias + x)
    return z


class _Cell(nn.Module):
    """``f(z, x) = tanh(module(z) + x)`` (no spectral cap: only the masks' cost is measured)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.module(z) + x)


def mask_cost(depth: int = 8, sparsity: float = 0.8, batch: int = 64, repeats: int = 30
              ) -> list[dict[str, Any]]:
    """Milliseconds of one training step (forward + backward) of a weight-tied layer on a
    linear cell (width 64) and a 3x3 conv cell (8 channels, 8x8), three ways: no masks, masks
    with the masked weights materialized (contdeq's :class:`~contdeq.WeightTied`), masks with
    sparse kernels on the kept entries. Variants interleaved, ``repeats`` rounds, the fastest
    kept; the sparse result is checked against the dense one first."""
    torch.manual_seed(0)
    cells = {"linear (width 64)": ("linear", nn.Linear(64, 64), torch.randn(batch, 64)),
             "conv 3x3 (8 channels, 8x8)": ("conv", nn.Conv2d(8, 8, 3, padding=1),
                                            torch.randn(batch, 8, 8, 8))}
    rows = []
    for label, (kind, module, x) in cells.items():
        best = _step_times(kind, module, x, depth, sparsity, repeats)
        weight_kb = module.weight.numel() * module.weight.element_size() / 1024
        rows += [{"cell": label, "variant": name, "ms": 1e3 * seconds,
                  "ratio": seconds / best["no masks"], "depth": depth, "sparsity": sparsity,
                  "batch": batch, "repeats": repeats, "masked_weights_kb": depth * weight_kb}
                 for name, seconds in best.items()]
    return rows


def _step_times(kind: str, module: nn.Module, x: Tensor, depth: int, sparsity: float,
                repeats: int) -> dict[str, float]:
    """Fastest seconds of a training step of each variant of :func:`mask_cost` on one cell."""
    plain = contdeq.WeightTied(_Cell(module), depth)
    masked = contdeq.WeightTied(_Cell(module), depth, masks="distinct", sparsity=sparsity)
    mask = next(masked.masks.buffers()).reshape(depth, module.weight.shape[0], -1)
    indices = [m.nonzero().t() for m in mask]

    def sparse() -> Tensor:
        return _sparse_step(kind, module.weight, module.bias, indices, x)

    with torch.no_grad():
        err = float((sparse() - masked(x)).abs().max())
    if err > 1e-5:
        raise AssertionError(f"sparse and dense masked outputs differ by {err:.3g}")
    variants = {"no masks": lambda: plain(x),
                "masked weights materialized (dense)": lambda: masked(x),
                "sparse kernels (never materialized)": sparse}
    best = dict.fromkeys(variants, math.inf)
    for rnd in range(repeats + 1):  # round 0: warm-up
        for name, forward in variants.items():
            module.zero_grad(set_to_none=True)
            start = time.perf_counter()
            forward().square().mean().backward()
            if rnd:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


# -- the masks study: dense / shared / distinct at equal width and equal active parameters --
#: The study's rows: ``(label, masks, channels)``. At 16 channels all three keep ``f``'s
#: shape (equal width: the masks just remove weights); at 23 channels a mask of sparsity 0.5
#: leaves ``f`` with 2,403 active entries per application, the dense 16-channel ``f``'s 2,320
#: within 4% (equal active parameters).
STUDY_ROWS = (("dense", None, 16), ("shared mask", "shared", 16),
              ("distinct masks", "distinct", 16), ("shared mask, wider", "shared", 23),
              ("distinct masks, wider", "distinct", 23))
STUDY_PRESETS: dict[str, dict[str, Any]] = {
    "full": {"epochs": 10, "seeds": 3, "n_train": None, "n_test": None},
    "smoke": {"epochs": 1, "seeds": 2, "n_train": 64, "n_test": 32},
}
def _study_model(masks: str | None, channels: int, depth: int, sparsity: float, seed: int,
                 n_train: int | None, n_test: int | None) -> tuple[nn.Module, Any]:
    task = load_task("digits-conv", channels, n_train, n_test)
    torch.manual_seed(seed)
    options = {"masks": masks, "sparsity": sparsity} if masks else {}
    layer = contdeq.WeightTied(task.f(), depth, seed=seed, **options)
    return nn.Sequential(task.encoder(), layer, task.head()), task


def mask_study(preset: str = "full", depth: int = 8, sparsity: float = 0.5,
               out: Path = RESULTS) -> list[dict[str, Any]]:
    """Train every row of :data:`STUDY_ROWS` on ``digits-conv`` for each seed (Adam, lr 2e-3,
    batch 64, the rows interleaved per seed); write ``weight_tied_masks.{md,json}``; return
    one record per (row, seed) with its final test accuracy and active parameters."""
    spec = STUDY_PRESETS[preset]
    name = "weight_tied_masks" if preset == "full" else f"weight_tied_masks_{preset}"
    records = []
    with threads(1):
        for seed in range(spec["seeds"]):
            for label, masks, channels in STUDY_ROWS:
                model, task = _study_model(masks, channels, depth, sparsity, seed,
                                           spec["n_train"], spec["n_test"])
                layer = model[1]
                optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
                gen = torch.Generator().manual_seed(seed)
                start = time.perf_counter()
                for _ in range(spec["epochs"]):
                    model.train()
                    order = torch.randperm(len(task.x_train), generator=gen)
                    for idx in order.split(64):
                        loss = F.cross_entropy(model(task.x_train[idx]), task.y_train[idx])
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                model.eval()
                with torch.no_grad():
                    acc = float((model(task.x_test).argmax(1) == task.y_test).float().mean())
                f_params = sum(p.numel() for p in layer.f.parameters())
                records.append({
                    "row": label, "masks": masks, "channels": channels, "seed": seed,
                    "accuracy": 100 * acc, "f_params": f_params,
                    "f_active": layer.active_parameters(),
                    "params": sum(p.numel() for p in model.parameters()),
                    "seconds": time.perf_counter() - start, "depth": depth,
                    "sparsity": sparsity if masks else 0.0, "epochs": spec["epochs"],
                    "n_train": len(task.x_train), "n_test": len(task.x_test)})
                print(f"seed {seed} {label}: {100 * acc:.1f}%", flush=True)
            # written after every seed, so an interrupted run keeps what it measured
            write_results(name, study_markdown(records), records, out=out)
    return records


def study_markdown(records: list[dict[str, Any]]) -> str:
    """The table of the study: per row, mean accuracy ± 95% CI over seeds, and the paired
    differences (same seed) against the dense row and between distinct and shared masks."""
    r0 = records[0]
    seeds = sorted({r["seed"] for r in records})
    by = {(r["row"], r["seed"]): r["accuracy"] for r in records}
    lines = [
        f"## Weight-tied masks on digits-conv ({machine_header()})", "",
        f"* depth {r0['depth']}, sparsity {max(r['sparsity'] for r in records):g} for the "
        "masked rows, "
        f"{r0['epochs']} epochs, Adam lr 2e-3, batch 64, {r0['n_train']} train / "
        f"{r0['n_test']} test images, {len(seeds)} seeds (one run each; a seed fixes the "
        "initial weights, the masks and the batch order).",
        "* f active: the entries of f's parameters one application uses; params: the whole "
        "model (encoder + f + head; the head grows with the channels).",
        "* Intervals: 95% Student t over seeds; differences are paired by seed.", "",
        "| row | channels | f params | f active | params | accuracy % (mean ± 95% CI) | "
        "− dense (paired) |",
        "|---|---:|---:|---:|---:|---:|---:|"]
    for label, _, channels in STUDY_ROWS:
        rows = [r for r in records if r["row"] == label]
        if not rows:
            continue
        mean, half = mean_ci([r["accuracy"] for r in rows])
        diff = mean_ci([by[(label, s)] - by[("dense", s)] for s in seeds])
        lines.append(f"| {label} | {channels} | {rows[0]['f_params']} | "
                     f"{rows[0]['f_active']:.0f} | {rows[0]['params']} | {mean:.2f} ± "
                     f"{half:.2f} | {diff[0]:+.2f} ± {diff[1]:.2f} |")
    lines += ["", "Paired differences between the mask kinds (same seed, same channels):", "",
              "| comparison | accuracy difference, points (mean ± 95% CI) |", "|---|---:|"]
    for a, b in (("distinct masks", "shared mask"),
                 ("distinct masks, wider", "shared mask, wider"),
                 ("distinct masks, wider", "dense"), ("shared mask, wider", "dense")):
        mean, half = mean_ci([by[(a, s)] - by[(b, s)] for s in seeds])
        lines.append(f"| {a} − {b} | {mean:+.2f} ± {half:.2f} |")
    return "\n".join(lines) + "\n"


# -- the run -----------------------------------------------------------------------------
def run(preset: str = "full", tasks: tuple[str, ...] = TASKS, epochs: int | None = None,
        seeds: tuple[int, ...] | None = None, out: Path = RESULTS, device: str = "cpu",
        mask_repeats: int = 30) -> dict[str, Any]:
    """Train the rows of every task in ``tasks``; write Markdown, JSON and figures under
    ``out``; return ``{"rows": ..., "mask_cost": ...}``."""
    spec = PRESETS[preset]
    base = replace(Config(), **spec["base"])
    with threads(base.threads):
        costs = mask_cost(repeats=mask_repeats)
        rows, notes, configs = [], [], {}
        for tname in tasks:
            cfg = replace(base, **spec[tname], models=MODELS)
            if epochs is not None:
                cfg.epochs = epochs
            if seeds is not None:
                cfg.seeds = seeds
            configs[tname] = cfg
            task = load_task(tname, cfg.width[tname], cfg.n_train, cfg.n_test, device)
            for row in train_task(task, models_for(task, MODELS), cfg, notes):
                depth, sparsity = layer_shape(row["model"])
                params, effective = parameter_counts(row["model"], task, cfg.seeds[0])
                row.update(depth=depth, sparsity=sparsity, params=params,
                           effective_params=effective, description=task.description,
                           n_train=len(task.x_train), n_test=len(task.x_test),
                           epochs=cfg.epochs, seeds=list(cfg.seeds))
                rows.append(row)
            _write(rows, costs, notes, configs, base, device, out)  # partial results, per task
    return {"rows": rows, "mask_cost": costs, "configs": {t: asdict(c)
                                                          for t, c in configs.items()}}


def _write(rows: list[dict[str, Any]], costs: list[dict[str, Any]], notes: list[str],
           configs: dict[str, Config], base: Config, device: str, out: Path) -> None:
    """Write the Markdown, JSON and figures of the rows so far."""
    notes = [
        *notes,
        "Per task: " + "; ".join(
            f"{t}: epochs={c.epochs}, seeds={list(c.seeds)}, width={c.width[t]}, "
            f"n_train={c.n_train or 'all'}, n_test={c.n_test or 'all'}"
            for t, c in configs.items()) + f"; shared: batch={base.batch}, lr={base.lr}, Adam.",
        f"DEQ(ode, ptc): forward atol = rtol = {TOL['tol']:g}, implicit backward tol "
        f"{TOL['backward_rtol']:g}; NeuralODE: dopri5, rtol = atol = {TOL['ode_tol']:g}, "
        "t_end = 1, backprop through the solver (it sets the target: its final accuracy - 0.5 "
        "point).",
        "Every row uses the same f (the paper benchmark's cells, z-weight spectral norm capped "
        "at 0.9) with the same initial weights; WeightTied(d) applies it d times from zero and "
        "backpropagates through the d applications; 'masks s': a distinct random mask per "
        "application on every Linear/Conv weight of f, zeroing the fraction s.",
        "params: trainable parameters of encoder + layer + head; effective: the same with f's "
        "counted as the entries one application uses (masked-out entries removed).",
        "graph MB: bytes held by the autograd graph of one training forward (paper.py's "
        "measure). Time to target: cumulative training time at the first epoch reaching the "
        "target; '-' = not reached.",
        "Measured in one run, models interleaved epoch by epoch, on a 2-core machine shared "
        "with other jobs: timings are noisy (ratios within a task are the figure to read).",
    ]
    header = (f"## Weight-tied benchmark `{base.name}` ({machine_header()}, device {device}; "
              "means over seeds)")
    out.mkdir(parents=True, exist_ok=True)
    write_results(base.name, to_markdown(rows, costs, header, notes),
                  {"rows": rows, "mask_cost": costs}, out=out)
    for path in plot(rows, out, base.name):
        print(f"written {path}")


def to_markdown(rows: list[dict[str, Any]], costs: list[dict[str, Any]], header: str,
                notes: list[str]) -> str:
    """One table per task, then the masks' cost."""
    lines = [header, ""] + [f"* {n}" for n in notes] + [""]
    for tname in dict.fromkeys(r["task"] for r in rows):
        trows = [r for r in rows if r["task"] == tname]
        r0 = trows[0]
        cells = ((r["model"], r["params"], f"{r['effective_params']:.0f}", f"{r['final_acc']:.1f}",
                  fmt(r["time_to_target_s"]), f"{r['s_per_epoch']:.3f}", f"{r['graph_mb']:.2f}",
                  f"{r['forward_nfe']:.1f}", f"{r['infer_ms']:.1f}") for r in trows)
        lines.append(table(
            "model | params | effective params | final acc % | time to target s | s/epoch | "
            "graph MB | fwd NFE | infer ms", cells, "l" + "r" * 8,
            [f"### {tname}: {r0['description']}; {r0['n_train']} train / {r0['n_test']} test; "
             f"{r0['epochs']} epochs, seeds {r0['seeds']}; target "
             f"{fmt(r0['target_acc'], '.1f')}%", ""]))
    if costs:
        c0 = costs[0]
        lines.append(table(
            "cell | variant | ms / step | × no masks | masked weights KB / forward",
            ((c["cell"], c["variant"], f"{c['ms']:.2f}", f"{c['ratio']:.2f}",
              f"{c['masked_weights_kb']:.1f}") for c in costs), "llrrr",
            [f"### What the masks cost: one training step, depth {c0['depth']}, sparsity "
             f"{c0['sparsity']:g}, batch {c0['batch']} (fastest of {c0['repeats']} interleaved "
             "rounds)", ""]))
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path, name: str) -> list[Path]:
    """Accuracy against depth and against sparsity (the DEQ and NeuralODE as horizontal
    lines), and time to target, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    paths = []
    for kind in ("depth", "sparsity", "target"):
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.0 * len(tasks), 3.8), squeeze=False)
        for ax, tname in zip(axes.flat, tasks, strict=True):
            trows = [r for r in rows if r["task"] == tname]
            tied = [r for r in trows if r["depth"] is not None]
            others = [r for r in trows if r["depth"] is None]
            if kind == "target":
                labels = [r["model"].removeprefix("MS ") for r in trows]
                values = [r["time_to_target_s"] for r in trows]
                ys = range(len(trows))
                ax.barh(ys, [v or 0.0 for v in values],
                        color=["C1" if r["depth"] is None else "C0" for r in trows])
                for y, v in zip(ys, values, strict=True):
                    if v is None:
                        ax.text(0, y, " not reached", va="center", fontsize=7)
                ax.set_yticks(list(ys), labels, fontsize=7)
                ax.invert_yaxis()
                ax.set_xlabel("time to target (s)")
            else:
                group, axis = ("sparsity", "depth") if kind == "depth" else ("depth", "sparsity")
                for i, g in enumerate(sorted({r[group] for r in tied})):
                    pts = sorted((r[axis], r["final_acc"]) for r in tied if r[group] == g)
                    ax.plot(*zip(*pts, strict=True), marker="o", color=f"C{i}",
                            label=f"WeightTied, {group} {g:g}")
                for j, r in enumerate(others):
                    ax.axhline(r["final_acc"], ls="--", lw=1, color=f"C{j + 4}",
                               label=r["model"].removeprefix("MS "))
                accs = [r["final_acc"] for r in trows]
                ax.set_ylim(min(accs) - 0.5, max(accs) + 0.5)  # every row's line in view
                ax.set_xlabel(axis)
                if kind == "depth":
                    ax.set_xscale("log", base=2)
                    ax.set_xticks(list(WEIGHT_TIED_DEPTHS), [str(d) for d in WEIGHT_TIED_DEPTHS])
                ax.set_ylabel("final test accuracy (%)")
                ax.legend(fontsize=7)
            ax.set_title(tname)
        fig.tight_layout()
        path = out / f"{name}_{kind}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced run (a few minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--epochs", type=int, default=None, help="override every task's")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--mask-repeats", type=int, default=30,
                        help="interleaved rounds of the mask-cost measurement")
    parser.add_argument("--masks-study", action="store_true",
                        help="only the study of dense / shared / distinct masks at equal width "
                             "and equal active parameters (weight_tied_masks.md)")
    args = parser.parse_args(argv)
    if args.masks_study:
        return {"masks_study": mask_study("smoke" if args.smoke else "full", out=args.out)}
    preset = "quick" if args.quick else "smoke" if args.smoke else "full"
    return run(preset, tuple(args.tasks), args.epochs,
               None if args.seeds is None else tuple(args.seeds), args.out, args.device,
               args.mask_repeats)


if __name__ == "__main__":
    warnings.filterwarnings("once")
    main()
