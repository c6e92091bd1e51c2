"""Robustness benchmark (issue #16): defences of continuous DEQs against adversarial inputs.

``python -m benchmarks.robust --help``; benchmarks/README.md describes it."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

import contdeq
from contdeq.robust import pgd, robust_accuracy, unrolled_gradients

from .common import (
    RESULTS,
    Net,
    Task,
    build_model,
    implicit_backward,
    layer_counts,
    load_task,
    machine_header,
    make_parser,
    mean_ci,
    table,
    threads,
    write_results,
)

TASKS = ("digits-conv", "spirals", "images-multiscale")
MODELS = ("DEQ", "DEQ + AT", "DEQ + AT + RIS", "DEQ + AT + RIS + ER", "LyapunovDEQ",
          "LyapunovDEQ + AT", "NeuralODE + AT", "NeuralSDE")
#: Rows that need the per-step solver hook (``contdeq.robust.random_intermediate_states`` /
#: ``entropy_reduction``).
HOOK_MODELS = ("DEQ + AT + RIS", "DEQ + AT + RIS + ER")
#: Attacks agreeing within this many accuracy points credit a defence.
AGREE = 5.0
#: The two L-inf radii per task, in input units (the first is also the training radius).
EPS: dict[str, tuple[float, float]] = {"digits-conv": (0.05, 0.1), "spirals": (0.1, 0.2),
                                        "images-multiscale": (0.03, 0.06)}
WIDTH: dict[str, int] = {"digits-conv": 4, "spirals": 64, "images-multiscale": 4}
#: Default epochs and training-set sizes per task (``None``: the whole split). The paper
#: benchmark trains 20 epochs on whole splits; only the cheap spirals task keeps that here.
EPOCHS: dict[str, int] = {"digits-conv": 4, "spirals": 20, "images-multiscale": 4}
N_TRAIN: dict[str, int | None] = {"digits-conv": 768, "spirals": None, "images-multiscale": 768}
NOISE = 0.1  # sigma of NeuralSDE
#: (task, model) pairs left out, with the reason.
SKIPPED: dict[tuple[str, str], str] = {
    ("images-multiscale", kind): "LyapunovDEQ's orthogonal output layer is a 1536 x 1536 "
    "parametrized matrix on this task's flattened two-scale state; one training step took "
    "about 20 s here (1 thread), too slow for this run"
    for kind in ("LyapunovDEQ", "LyapunovDEQ + AT")}
FIGURE = Path(__file__).resolve().parent.parent / "docs" / "robust_accuracy.png"


@dataclass
class Config:
    """Sizes of a run."""

    epochs: int | None = None  # None: EPOCHS[task]
    n_train: int | None = None  # None: N_TRAIN[task]
    n_test: int = 128
    batch: int = 64
    lr: float = 2e-3
    seeds: tuple[int, ...] = (0,)
    tasks: tuple[str, ...] = TASKS
    models: tuple[str, ...] = MODELS
    train_pgd_steps: int = 3
    attack_steps: int = 20
    square_queries: int = 200
    ris_max_steps: int = 8
    er_every: int = 2
    device: str = "cpu"


def sizes(cfg: Config, task: str) -> tuple[int, int | None]:
    """Epochs and training-set size of ``task`` (``cfg``'s, else the task's defaults;
    ``n_train`` 0 or ``None`` in the result: the whole split)."""
    epochs = EPOCHS[task] if cfg.epochs is None else cfg.epochs
    n_train = N_TRAIN[task] if cfg.n_train is None else cfg.n_train
    return epochs, n_train or None


QUICK = {"epochs": 1, "n_train": 64, "n_test": 16, "batch": 32, "attack_steps": 2,
         "square_queries": 5, "train_pgd_steps": 1}


class FlatCell(nn.Module):
    """``f`` of a task on flat ``(B, D)`` states: ``z`` is split into the task's per-sample
    state shapes (one tensor, or a tuple for a multi-scale state) and ``f``'s output flattened
    back, so the flat-state layers (:class:`contdeq.LyapunovDEQ`, ...) run the same ``f``."""

    def __init__(self, f: nn.Module, shapes: tuple[tuple[int, ...], ...]) -> None:
        super().__init__()
        self.f = f
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes]

    def unflatten(self, z: Tensor) -> Tensor | tuple[Tensor, ...]:
        """``(B, D)`` -> the task's state (``(B, *shape)`` or a tuple of them)."""
        parts = tuple(p.reshape(len(z), *s)
                      for p, s in zip(z.split(self.sizes, dim=1), self.shapes, strict=True))
        return parts if len(parts) > 1 else parts[0]

    @staticmethod
    def flatten(z: Tensor | tuple[Tensor, ...]) -> Tensor:
        """The task's state -> ``(B, D)``."""
        parts = z if isinstance(z, tuple) else (z,)
        return torch.cat([p.flatten(1) for p in parts], dim=1)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.flatten(self.f(self.unflatten(z), x))


class FlatLayer(nn.Module):
    """A flat-state layer around a :class:`FlatCell`: ``x`` (the encoder's output) -> the task's
    state. The solve starts at ``x`` flattened and zero-padded to the state size (the start
    :class:`contdeq.LyapunovDEQ` needs; zeros' scale for the others)."""

    def __init__(self, layer: nn.Module, cell: FlatCell, start_at_x: bool) -> None:
        super().__init__()
        self.layer, self.cell, self.start_at_x = layer, cell, start_at_x

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        size = sum(self.cell.sizes)
        z0 = x.new_zeros(len(x), size)
        if self.start_at_x:
            flat = x.flatten(1)
            z0 = torch.cat([flat, z0[:, flat.shape[1]:]], dim=1)
        return self.cell.unflatten(self.layer(x, z0=z0))

    @property
    def stats(self) -> Any:
        return getattr(self.layer, "stats", None)


class ConstantNoise(nn.Module):
    """Diffusion ``g(z, x) = sigma`` (diagonal, shaped like ``z``)."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.full_like(z, self.sigma)


def state_shapes(task: Task, encoder: nn.Module) -> tuple[tuple[int, ...], ...]:
    """Per-sample state shapes of ``task`` (``encoder``'s output shape for one tensor)."""
    if task.state_shapes is not None:
        return task.state_shapes
    with torch.no_grad():
        return (tuple(encoder(task.x_train[:1]).shape[1:]),)


def base_kind(name: str) -> str:
    """``"DEQ + AT + RIS"`` -> ``"DEQ"``."""
    return name.split(" + ")[0]


def build(name: str, task: Task, seed: int) -> nn.Module:
    """Model ``name`` for ``task``: ``encoder -> layer -> head`` with the paper benchmark's
    encoder, ``f`` and head, seeded alike for every row."""
    kind = base_kind(name)
    if kind in ("DEQ", "NeuralODE"):
        return build_model({"DEQ": "DEQ(anderson)", "NeuralODE": "NeuralODE"}[kind], task, seed)
    torch.manual_seed(seed)  # as build_model: the same encoder, f and head for every row
    encoder, f, head = task.encoder(), task.f(), task.head()
    cell = FlatCell(f, state_shapes(task, encoder))
    dim = sum(cell.sizes)
    options = {"atol": 5e-3, "rtol": 5e-3, "on_nonconvergence": "ignore"}
    torch.manual_seed(seed + 2)
    if kind == "LyapunovDEQ":
        layer: nn.Module = contdeq.LyapunovDEQ(cell, dim, hidden=(32,), solver="anderson",
                                               max_steps=100, **options)
    elif kind == "NeuralSDE":
        layer = contdeq.NeuralSDE(cell, ConstantNoise(NOISE), 1.0, dt=0.05, state_shape=dim)
    else:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    layer = FlatLayer(layer, cell, start_at_x=kind == "LyapunovDEQ")
    return Net(encoder, layer, head).to(task.x_train.device)


def box(task: Task) -> tuple[float, float]:
    """The task's input range ``(lo, hi)`` (over its training inputs); attacks stay in it."""
    return float(task.x_train.min()), float(task.x_train.max())


class FromUnitBox(nn.Module):
    """``model`` on ``(B, C, H, W)`` images in ``[0, 1]``: maps them affinely onto the task's
    box and to the task's input shape (torchattacks' convention)."""

    def __init__(self, model: nn.Module, lo: float, hi: float, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.lo, self.hi, self.shape = model, lo, hi, shape

    def forward(self, u: Tensor) -> Tensor:
        return self.model((self.lo + (self.hi - self.lo) * u).reshape(len(u), *self.shape))


def as_image(x: Tensor) -> Tensor:
    """``(B, ...)`` -> ``(B, C, H, W)``: images unchanged, a 16-vector as ``1 x 4 x 4``."""
    if x.ndim == 4:
        return x
    side = math.isqrt(x[0].numel())
    if side * side != x[0].numel():
        raise ValueError(f"Square needs square images; cannot view {tuple(x.shape[1:])} as one")
    return x.reshape(len(x), 1, side, side)


def square_attack(model: nn.Module, task: Task, eps: float, queries: int, seed: int
                  ) -> Callable[[Tensor, Tensor], Tensor]:
    """torchattacks' Square at L-inf ``eps`` (input units) on ``model`` through the unit box."""
    import torchattacks

    lo, hi = box(task)
    unit = FromUnitBox(model, lo, hi, tuple(task.x_test.shape[1:])).eval()
    attack = torchattacks.Square(unit, eps=eps / (hi - lo), n_queries=queries, seed=seed)

    def run(x: Tensor, y: Tensor) -> Tensor:
        u = as_image((x - lo) / (hi - lo))
        return (lo + (hi - lo) * attack(u, y)).reshape(x.shape)
    return run


def training_context(name: str, model: nn.Module, cfg: Config, seed: int
                     ) -> Callable[[], Any]:
    """A factory of the context each training forward runs in (random intermediate states for
    the RIS rows)."""
    if "RIS" not in name:
        return nullcontext
    generator = torch.Generator().manual_seed(seed + 3)
    return lambda: contdeq.robust.random_intermediate_states(  # the original code's defaults
        model, max_steps=cfg.ris_max_steps, generator=generator)


def inference_context(name: str, model: nn.Module, task: Task, cfg: Config
                      ) -> Callable[[], Any]:
    """A factory of the context inference (and every adaptive attack) runs in: entropy
    reduction for the ER rows, on the raw input (through the model's encoder), with the
    original code's schedule (10 signed steps a round, every ``er_every`` solver steps, 4
    rounds) and proportions (a ball of the attack's eps1, steps of eps1 / 4), inside the
    task's input box."""
    if not name.endswith("+ ER"):
        return nullcontext
    eps = EPS[task.name][0]
    return lambda: contdeq.robust.entropy_reduction(
        model, model.head, encoder=model.encoder, every=cfg.er_every, step_size=eps / 4,
        eps=eps, clamp=box(task))


def train(model: nn.Module, name: str, task: Task, cfg: Config, seed: int) -> float:
    """Train ``model`` (adversarially for the ``AT`` rows); returns the training seconds."""
    lo, hi = box(task)
    eps = EPS[task.name][0]
    adversarial = "AT" in name.split(" + ")
    context = training_context(name, model, cfg, seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    torch.manual_seed(seed + 4)  # random starts of the training attacks, SDE noise
    start = time.perf_counter()
    for epoch in range(sizes(cfg, task.name)[0]):
        g = torch.Generator().manual_seed(100_003 * seed + epoch)
        order = torch.randperm(len(task.x_train), generator=g).to(task.x_train.device)
        for idx in order.split(cfg.batch):
            xb, yb = task.x_train[idx], task.y_train[idx]
            if adversarial:
                model.eval()
                xb = pgd(model, xb, yb, eps, steps=cfg.train_pgd_steps, clamp=(lo, hi))
            model.train()
            with context():
                loss = F.cross_entropy(model(xb), yb) + contdeq.aux_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return time.perf_counter() - start


def inference_nfe(model: nn.Module, x: Tensor) -> float:
    """``f`` evaluations of one inference forward on ``x`` (``(B, ...)``)."""
    layer = model.layer
    inner = layer.layer if isinstance(layer, FlatLayer) else layer
    with torch.no_grad():
        model(x)
    if isinstance(inner, contdeq.NeuralSDE):
        return float(math.ceil(inner.t_end / inner.dt - 1e-9))
    return float(layer_counts(inner)[0])


def evaluate(model: nn.Module, name: str, task: Task, cfg: Config, seed: int) -> dict[str, Any]:
    """Clean accuracy and the robust accuracies (in %), inference NFE, warnings."""
    lo, hi = box(task)
    eps1, eps2 = EPS[task.name]
    x, y = task.x_test, task.y_test
    context = inference_context(name, model, task, cfg)
    steps = cfg.attack_steps
    row: dict[str, Any] = {}

    def measure(key: str, attack: Callable[[Tensor, Tensor], Tensor] | None,
                grad_mode: Callable[[], Any] = nullcontext, transfer: bool = False) -> None:
        """``transfer``: the attack runs without the defence (``context``), predictions with."""
        torch.manual_seed(seed + 5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # ER on the attack's solver, or (transfer) on the predictions only
            with grad_mode(), nullcontext() if transfer else context(), parametrize.cached():
                row[key] = 100.0 * robust_accuracy(model, (x, y), attack, batch_size=cfg.batch,
                                                   **({"defence": context} if transfer else {}))
        row.setdefault("warnings", {})[key] = sum(
            "converge" in str(w.message).lower() for w in caught)

    def pgd_attack(eps: float) -> Callable[[Tensor, Tensor], Tensor]:
        return lambda a, b: pgd(model, a, b, eps, steps=steps, clamp=(lo, hi))

    implicit = partial(implicit_backward, model)
    measure("clean", None)
    measure("pgd_eps1", pgd_attack(eps1), implicit)
    measure("pgd_eps2", pgd_attack(eps2), implicit)
    if any(isinstance(m, contdeq.DEQ) for m in model.modules()):
        measure("pgd_unrolled_eps1", pgd_attack(eps1), lambda: unrolled_gradients(model))
    else:  # backprop through the solver already: the attack above is the unrolled one
        row["pgd_unrolled_eps1"] = row["pgd_eps1"]
    measure("square_eps1", square_attack(model, task, eps1, cfg.square_queries, seed))
    if name.endswith("+ ER"):  # transfer: crafted on the undefended model, defended predictions
        measure("pgd_transfer_eps1", pgd_attack(eps1), implicit, transfer=True)
    else:  # no defence: the transfer attack is the implicit-gradient one
        row["pgd_transfer_eps1"] = row["pgd_eps1"]
        row["warnings"]["pgd_transfer_eps1"] = 0
    with context():
        row["infer_nfe"] = inference_nfe(model, x[:cfg.batch])
    return row


def credit(row: dict[str, Any]) -> None:
    """Adds ``worst_eps1`` (lowest of the three attacks), ``spread_eps1`` and ``credited``."""
    values = [row["pgd_eps1"], row["pgd_unrolled_eps1"], row["square_eps1"],
              row.get("pgd_transfer_eps1", row["pgd_eps1"])]
    row["worst_eps1"] = min(values)
    row["spread_eps1"] = max(values) - min(values)
    row["credited"] = row["spread_eps1"] <= AGREE


def run_cell(task: Task, name: str, cfg: Config, seed: int,
             trained: dict[str, tuple[nn.Module, float]]) -> dict[str, Any]:
    """Train (or reuse, for the ``+ ER`` row) and evaluate one model."""
    base = name.removesuffix(" + ER")
    if base in trained:
        model, seconds = trained[base]
    else:
        model = build(base, task, seed)
        seconds = train(model, base, task, cfg, seed)
        trained[base] = (model, seconds)
    row = {"task": task.name, "model": name, "seed": seed, "train_s": seconds}
    row.update(evaluate(model, name, task, cfg, seed))
    credit(row)
    return row


#: Accuracy columns whose per-seed values and 95 % confidence intervals are kept.
ACCURACIES = ("clean", "pgd_eps1", "pgd_eps2", "pgd_unrolled_eps1", "square_eps1",
              "pgd_transfer_eps1", "worst_eps1")
def mean_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds of one (task, model)'s rows (numbers; warnings summed), with the
    per-seed accuracies (``per_seed``) and their 95 % intervals (``ci95``)."""
    out = dict(rows[0])
    out["seeds"] = [r["seed"] for r in rows]
    out["per_seed"] = {k: [r[k] for r in rows] for k in ACCURACIES if k in rows[0]}
    out["ci95"] = {k: mean_ci(v)[1] for k, v in out["per_seed"].items()}
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "seed":
            out[key] = sum(r[key] for r in rows) / len(rows)
    out["warnings"] = {k: sum(r["warnings"][k] for r in rows) for k in rows[0]["warnings"]}
    credit(out)
    return out


def goal_check(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's goals, one line each, measured on ``rows`` (means over seeds)."""
    by = {(r["task"], r["model"]): r for r in rows}
    lines, met_tasks = [], {m: [] for m in HOOK_MODELS}
    attacks = (("pgd_eps1", "PGD-20 implicit"), ("pgd_unrolled_eps1", "PGD-20 unrolled"),
               ("square_eps1", "Square"))
    for task in dict.fromkeys(r["task"] for r in rows):
        at = by.get((task, "DEQ + AT"))
        for model in HOOK_MODELS:
            r = by.get((task, model))
            if at is None or r is None:
                continue
            gains = {label: r[key] - at[key] for key, label in attacks}
            clean = r["clean"] - at["clean"]
            ok = all(g >= 3 for g in gains.values()) and abs(clean) <= 1
            if ok:
                met_tasks[model].append(task)
            lines.append(f"- {task}, {model} vs DEQ + AT: robust gain "
                         + ", ".join(f"{label} {g:+.1f}" for label, g in gains.items())
                         + f" points; clean {clean:+.1f} points -> "
                         + ("met" if ok else "missed") + paired(r, at))
        ris, er = by.get((task, "DEQ + AT + RIS")), by.get((task, "DEQ + AT + RIS + ER"))
        if ris is not None and er is not None:  # ER alone: the same trained model
            lines.append(f"- {task}, entropy reduction alone (DEQ + AT + RIS + ER vs DEQ + AT "
                         f"+ RIS): worst attack {er['worst_eps1'] - ris['worst_eps1']:+.1f}, "
                         f"clean {er['clean'] - ris['clean']:+.1f} points" + paired(er, ris))
        plain, lya = by.get((task, "DEQ")), by.get((task, "LyapunovDEQ"))
        if plain is not None and lya is not None:
            diffs = {label: lya[key] - plain[key] for key, label in attacks}
            lines.append(f"- {task}, LyapunovDEQ vs DEQ (no AT): robust "
                         + ", ".join(f"{label} {d:+.1f}" for label, d in diffs.items())
                         + f" points; clean {lya['clean'] - plain['clean']:+.1f} points"
                         + paired(lya, plain))
    for model, tasks in met_tasks.items():
        verdict = "MET" if len(tasks) >= 2 else "NOT MET"
        lines.append(f"- **{model}: goal {verdict}** (>= 3 points over DEQ + AT under all "
                     f"three attacks at clean within 1 point on {len(tasks)} task(s): "
                     f"{', '.join(tasks) or 'none'}; needed 2)")
    return lines


def paired(row: dict[str, Any], base: dict[str, Any]) -> str:
    """``row - base`` per seed (the same seeds: the models share data, initialisation and
    attack seeds), mean and 95 % interval, for the worst eps1 attack and clean accuracy;
    empty for one seed."""
    a, b = row.get("per_seed", {}), base.get("per_seed", {})
    if row.get("seeds") != base.get("seeds") or len(row.get("seeds", [])) < 2:
        return ""
    parts = []
    for key, label in (("worst_eps1", "worst attack"), ("clean", "clean")):
        diffs = [x - y for x, y in zip(a[key], b[key], strict=True)]
        parts.append(f"{label} {sum(diffs) / len(diffs):+.1f} ± {mean_ci(diffs)[1]:.1f}")
    return f" (paired over seeds {row['seeds']}, 95 % CI: " + "; ".join(parts) + ")"


def cell(row: dict[str, Any], key: str) -> str:
    """``mean`` or ``mean ± 95 % CI`` (several seeds) of an accuracy column."""
    value = f"{row[key]:.1f}"
    ci = row.get("ci95", {}).get(key, float("nan"))
    return value if math.isnan(ci) else f"{value} ± {ci:.1f}"


def to_markdown(rows: list[dict[str, Any]], cfg: Config, minutes: float) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines = [
        "# Robustness benchmark",
        "",
        f"{machine_header()}; one run ({minutes:.0f} min wall for the tasks of the last "
        f"invocation), seeds {list(cfg.seeds)} (means); the machine was shared with other "
        "jobs, so the training times are indicative only.",
        f"Training: Adam (lr {cfg.lr}, batch {cfg.batch}), epochs / training samples per task: "
        + ", ".join(f"{t} {sizes(cfg, t)[0]} / {sizes(cfg, t)[1] or 'all'}" for t in tasks)
        + f"; adversarial training with PGD-"
        f"{cfg.train_pgd_steps} at eps1; random intermediate states at a step <= "
        f"{cfg.ris_max_steps}; entropy reduction every {cfg.er_every} solver steps; "
        f"evaluation on {cfg.n_test} test samples. "
        f"PGD-{cfg.attack_steps} (L-inf, step 2.5 eps / steps, random start, inside the task's "
        f"input box) through the implicit gradient at eps1 and eps2, through the unrolled "
        f"solver at eps1; Square: torchattacks, {cfg.square_queries} queries, eps1; transfer "
        f"(ER rows): PGD crafted on the model without entropy reduction, classified with it. "
        f"Credited: the lowest of the eps1 attacks where they agree within {AGREE:g} "
        "points. With several seeds: mean ± half-width of the 95 % confidence interval over "
        "seeds (Student's t).",
        "Eps per task (input units): " + ", ".join(
            f"{t} {EPS[t][0]:g} / {EPS[t][1]:g}" for t in tasks) + ".",
        "",
    ]
    cells = ((r["task"], r["model"], *(cell(r, k) for k in (
        "clean", "pgd_eps1", "pgd_eps2", "pgd_unrolled_eps1", "square_eps1")),
        cell(r, "pgd_transfer_eps1") if "pgd_transfer_eps1" in r else "-",
        cell(r, "worst_eps1") if r["credited"] else f"no (spread {r['spread_eps1']:.1f})",
        f"{r['train_s']:.0f}", f"{r['infer_nfe']:.0f}", sum(r["warnings"].values())) for r in rows)
    pgd = f"PGD-{cfg.attack_steps}"
    return table(f"task | model | clean | {pgd} eps1 | {pgd} eps2 | {pgd} unrolled eps1 | Square "
                 "eps1 | PGD transfer eps1 | credited eps1 | train s | infer NFE | conv. warnings",
                 cells, head=lines) + "\n".join(["", "## Goal check", "", *goal_check(rows), ""])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Robust (the lowest of the three eps1 attacks) against clean accuracy, a panel a task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    markers = "os^vD<>pPX*h"
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, model in enumerate(models):
            for r in rows:
                if r["task"] == task and r["model"] == model:
                    ax.scatter(r["clean"], r["worst_eps1"], marker=markers[i % len(markers)],
                               s=50, label=model, facecolors="none" if not r["credited"]
                               else None, color=f"C{i}")
        ax.set_title(task)
        ax.set_xlabel("clean accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("robust accuracy at eps1 (%), worst attack")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.collections}
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="lower center",
               ncol=min(len(handles), 5))
    fig.suptitle("Robust vs clean accuracy (hollow: attacks disagree, not credited)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merged(rows: list[dict[str, Any]], files: list[Path]) -> list[dict[str, Any]]:
    """``rows`` and the rows of the JSON ``files`` for other (task, model) pairs, in table
    order."""
    done = {(r["task"], r["model"]) for r in rows}
    for path in files:
        if path.is_file():
            for r in json.loads(path.read_text()):
                if (r["task"], r["model"]) not in done:
                    rows = [*rows, r]
                    done.add((r["task"], r["model"]))
    order = {key: i for i, key in enumerate((t, m) for t in TASKS for m in MODELS)}
    return sorted(rows, key=lambda r: order.get((r["task"], r["model"]), len(order)))


def run(cfg: Config, name: str = "robust", out: Path = RESULTS, figure: Path | None = FIGURE,
        merge: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """Run the benchmark; writes ``<out>/<name>.md`` / ``.json`` and the figure after every
    task (with the rows of the JSON files ``merge`` for the pairs not run here). A model that
    fails is noted in the Markdown and dropped; the others go on."""
    models = list(cfg.models)
    notes = [f"skipped {t} / {m}: {why}" for (t, m), why in SKIPPED.items()
              if t in cfg.tasks and m in models]
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def write() -> list[dict[str, Any]]:
        table = merged(rows, list(merge))
        markdown = to_markdown(table, cfg, (time.perf_counter() - start) / 60)
        if notes:
            markdown += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        write_results(name, markdown, table, out)
        if figure is not None and table:
            plot(table, figure)
        return table

    with threads(1):
        for task_name in cfg.tasks:
            task = load_task(task_name, WIDTH[task_name], sizes(cfg, task_name)[1], cfg.n_test,
                             cfg.device)
            per_model: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
            for seed in cfg.seeds:
                trained: dict[str, tuple[nn.Module, float]] = {}
                for model in models:
                    if (task_name, model) in SKIPPED:
                        continue
                    try:
                        row = run_cell(task, model, cfg, seed, trained)
                    except Exception as exc:  # a failing model must not stop the run
                        notes.append(f"FAILED {task_name} / {model} (seed {seed}): "
                                     f"{type(exc).__name__}: {exc}")
                        print(notes[-1], flush=True)
                        continue
                    print(f"{task_name:18s} {model:22s} seed {seed}: "
                          f"clean {row['clean']:.1f} pgd {row['pgd_eps1']:.1f} / "
                          f"{row['pgd_eps2']:.1f} unrolled {row['pgd_unrolled_eps1']:.1f} "
                          f"square {row['square_eps1']:.1f} ({row['train_s']:.0f} s train, "
                          f"{(time.perf_counter() - start) / 60:.1f} min)", flush=True)
                    per_model[model].append(row)
            rows += [mean_rows(r) for r in per_model.values() if len(r) == len(cfg.seeds)]
            write()
        return write()  # inside: the header reports the run's thread count


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes for the smoke test (seconds)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--n-train", type=int, help="0: the whole training split")
    parser.add_argument("--n-test", type=int)
    parser.add_argument("--train-pgd-steps", type=int)
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--tasks", nargs="*", choices=TASKS,
                        help="none: only merge the --merge files into the table")
    parser.add_argument("--models", nargs="+", choices=MODELS)
    parser.add_argument("--merge", type=Path, nargs="+", default=(),
                        help="JSON results whose rows for (task, model) pairs not run here "
                             "are kept in the table")
    parser.add_argument("--name", default=None, help="results name (default robust)")
    parser.add_argument("--figure", type=Path, default=None,
                        help=f"figure path (default {FIGURE}; quick runs: none)")
    args = parser.parse_args()
    args.device = str(args.device)
    cfg = Config(**(QUICK if args.quick else {}))
    for key in ("epochs", "n_train", "n_test", "train_pgd_steps", "device"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    for key in ("seeds", "tasks", "models"):
        if getattr(args, key) is not None:
            setattr(cfg, key, tuple(getattr(args, key)))
    figure = args.figure or (None if args.quick else FIGURE)
    run(cfg, args.name or ("robust_quick" if args.quick else "robust"), args.out, figure,
        tuple(args.merge))


if __name__ == "__main__":
    main()
