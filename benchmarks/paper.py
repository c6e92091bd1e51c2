"""Paper benchmark: train every layer kind on the same tasks, in one process, and compare.

For each task (:mod:`paper_tasks`: digits MLP, procedural spirals, digits conv) and each model
(:mod:`paper_models`: NeuralODE backprop/adjoint, DEQ(ode) dopri5/ptc, DEQ(anderson, broyden,
picard) implicit/jfb, SkipDEQ, SkipRegDEQ, torchdeq default/IFT), with the same ``f``, data,
Adam optimizer, epochs and seeds: train, evaluating test accuracy after every epoch (not
counted in training time). The models of a task train interleaved, epoch by epoch (epoch 0 of
each, then epoch 1 of each, ...), so a drift in the machine's speed during the run reaches every
model alike. Reported per cell (means over seeds):

* training wall time per epoch; time to the target accuracy (the NeuralODE's final accuracy
  minus 0.5 point; cumulative training time at the first epoch reaching it);
* mean forward NFE and backward iterations per batch; final test accuracy;
* inference time (whole test set) and NFE per batch; peak memory (bytes held by the autograd
  graph on CPU, ``torch.cuda.max_memory_allocated`` on GPU);
* overhead = training time per batch / ((forward NFE + backward iterations) x time of one
  ``f`` call at the training batch size);
* ratios of epoch time and time to target against the NeuralODE and against torchdeq's best
  configuration (the one with the shortest time to target, else the fastest epoch).

Outputs ``benchmarks/results/<name>.md`` / ``.json`` and figures ``<name>_accuracy.png``
(accuracy vs training wall time) and ``<name>_nfe.png`` (forward NFE per epoch).

Usage: ``python benchmarks/paper.py [--quick | --smoke] [--seeds 0 1] [--tasks ...]
[--models ...] [--checkpoint-dir DIR [--resume]] [--out DIR] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import contdeq

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    RESULTS,
    SavedTensors,
    add_device_argument,
    machine_header,
    progress_bar,
    synchronize,
    time_min,
    write_results,
)
from paper_headline import headline, ratio
from paper_models import (
    COMPILED_MODELS,
    MODELS,
    MULTISCALE_MODELS,
    OPTIONAL_MODELS,
    TOL,
    build_model,
    has_torchdeq,
    layer_counts,
    models_for,
    set_tolerance,
)
from paper_tasks import TASKS, Task, load_task

TORCHDEQ_MODELS = tuple(m for m in MODELS if m.startswith("torchdeq"))
ALL_MODELS = (*MODELS, *MULTISCALE_MODELS)
DEFAULT_MODELS = tuple(m for m in ALL_MODELS if m not in OPTIONAL_MODELS)


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
    models: tuple[str, ...] = DEFAULT_MODELS
    threads: int | None = None


PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "quick": {"name": "paper_quick", "epochs": 4, "batch": 64, "n_train": 768, "n_test": 256,
              "seeds": (0,),
              "threads": 1, "width": {"digits-mlp": 32, "spirals": 32, "digits-conv": 4,
                                                  "images-multiscale": 4}},
    "smoke": {"name": "paper_smoke", "epochs": 2, "batch": 32, "n_train": 64, "n_test": 32,
              "seeds": (0,),
              "threads": 1, "width": {"digits-mlp": 8, "spirals": 8, "digits-conv": 2,
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
        t = time_min(lambda: f(z, x), repeats=20)
    return t


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


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
                seed: int, epoch: int) -> dict[str, float]:
    """One epoch; training time excludes batch selection and memory bookkeeping only.

    The autograd graph's size is measured after the timed steps, by one more forward on the
    epoch's first batch with saved-tensor hooks (the hooks cost a Python call per saved tensor:
    inside the timed steps they would slow the models that save many, the NeuralODE first).
    """
    model.train()
    device = task.x_train.device
    perm = epoch_order(len(task.x_train), seed, epoch, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds, fwd, bwd = 0.0, [], []
    for i in range(0, len(perm), batch):
        idx = perm[i:i + batch]
        xb, yb = task.x_train[idx], task.y_train[idx]
        synchronize(device)
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(xb), yb) + contdeq.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        synchronize(device)
        seconds += time.perf_counter() - start
        f_nfe, b_it = layer_counts(model.layer)
        fwd.append(f_nfe)
        bwd.append(math.nan if b_it is None else b_it)
    return {
        "train_s": seconds, "batches": len(fwd), "forward_nfe": sum(fwd) / len(fwd),
        "backward_iterations": sum(bwd) / len(bwd),
        "graph_mb": graph_megabytes(model, task.x_train[perm[:batch]]),
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else math.nan,
    }


def graph_megabytes(model: nn.Module, xb: Tensor) -> float:
    """Megabytes the autograd graph of a training forward on ``xb`` holds (no backward, no
    optimizer step; in training mode, so a spectral cap takes one more power-iteration step)."""
    saved = SavedTensors()
    with saved.record():
        model(xb)
    return saved.megabytes


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
    warmed up first (:func:`warm_up`; ``warmup_s``)."""

    def __init__(self, task: Task, name: str, cfg: Config, seed: int,
                 checkpoint_dir: Path | None, resume: bool) -> None:
        self.task, self.name, self.cfg, self.seed = task, name, cfg, seed
        self.model = build_model(name, task, seed)
        self.warmup_s = warm_up(self.model, task, cfg.batch) if name in COMPILED_MODELS else 0.0
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.history: list[dict[str, float]] = []
        self.path = None
        if checkpoint_dir is not None:
            self.path = checkpoint_dir / task.name / f"{_slug(name)}_s{seed}.pt"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume and self.path.is_file():
                self.history = list(
                    contdeq.load_checkpoint(self.path, self.model, self.opt).extra["history"])

    def train_epoch(self) -> None:
        """Train and evaluate the next epoch (nothing once ``cfg.epochs`` are done)."""
        epoch = len(self.history)
        if epoch >= self.cfg.epochs:
            return
        record = train_epoch(self.model, self.opt, self.task, self.cfg.batch, self.seed, epoch)
        acc, infer_s, infer_nfe = evaluate(self.model, self.task, self.cfg.batch)
        record.update(epoch=epoch, test_acc=acc, infer_s=infer_s, infer_nfe=infer_nfe)
        self.history.append(record)
        if self.path is not None:
            contdeq.save_checkpoint(self.path, self.model, self.opt, epoch=epoch,
                                    extra={"history": self.history})


def train_interleaved(task: Task, names: list[str], cfg: Config, seed: int,
                      checkpoint_dir: Path | None, resume: bool, notes: list[str]
                      ) -> dict[str, list[dict[str, float]]]:
    """Train every model of ``names`` on ``task`` epoch by epoch in turn (epoch 0 of each, then
    epoch 1 of each, ...), so a drift in the machine's speed over the run reaches every model
    alike. A model that fails is noted and dropped; the others go on. Returns the histories."""
    def failed(name: str, exc: Exception) -> None:
        notes.append(f"FAILED {task.name} / {name}: {type(exc).__name__}: {exc}")
        print(notes[-1], flush=True)

    cells: dict[str, Cell] = {}
    for name in names:
        try:
            cells[name] = Cell(task, name, cfg, seed, checkpoint_dir, resume)
        except Exception as exc:  # a model that cannot be built must not stop the suite
            failed(name, exc)
    notes += [f"{task.name} seed {seed}: warm-up (compilation) of {name}: {cell.warmup_s:.1f} s, "
              "not counted in training time" for name, cell in cells.items() if cell.warmup_s]
    with progress_bar(cfg.epochs * len(cells), f"{task.name} seed {seed}") as bar:
        for _ in range(cfg.epochs):
            for name, cell in list(cells.items()):
                bar.set_postfix_str(name)
                try:
                    cell.train_epoch()
                except Exception as exc:  # a diverging model must not stop the suite
                    failed(name, exc)
                    del cells[name]
                bar.update()
    for name, cell in cells.items():
        h = cell.history[-1]
        seconds = sum(r["train_s"] for r in cell.history)
        print(f"{task.name:12s} seed {seed} {name:20s} acc={h['test_acc']:5.1f}% "
              f"nfe={h['forward_nfe']:6.1f} (trained {seconds:.1f} s)", flush=True)
    return {name: cell.history for name, cell in cells.items()}


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


def summarize(task: Task, histories: dict[str, list[dict[str, float]]], t_f: float,
              cfg: Config) -> list[dict[str, Any]]:
    """One row per model, with the target accuracy, time to it, overhead and the ratios."""
    ref = task.reference
    target = histories[ref][-1]["test_acc"] - 0.5 if ref in histories else None
    rows = []
    for name, hist in histories.items():
        elapsed, ttt = 0.0, None
        for rec in hist:
            elapsed += rec["train_s"]
            if target is not None and ttt is None and rec["test_acc"] >= target:
                ttt = elapsed
        per_epoch = _mean([r["train_s"] for r in hist])
        fwd = _mean([r["forward_nfe"] for r in hist])
        bwd = _mean([r["backward_iterations"] for r in hist])
        per_batch = per_epoch / hist[0]["batches"]
        calls = fwd + (0.0 if math.isnan(bwd) else bwd)
        rows.append({
            "task": task.name, "model": name, "target_acc": target,
            "s_per_epoch": per_epoch, "time_to_target_s": ttt, "forward_nfe": fwd,
            "backward_iterations": None if math.isnan(bwd) else bwd,
            "final_acc": hist[-1]["test_acc"], "infer_ms": 1e3 * hist[-1]["infer_s"],
            "infer_nfe": hist[-1]["infer_nfe"], "graph_mb": max(r["graph_mb"] for r in hist),
            "peak_cuda_mb": _nan_none(max(r["peak_cuda_mb"] for r in hist)),
            "f_call_ms": 1e3 * t_f, "overhead": per_batch / (calls * t_f) if calls else None,
            "history": hist,
        })
    by_name = {r["model"]: r for r in rows}
    node = by_name.get(ref)
    tdeq = [by_name[m] for m in TORCHDEQ_MODELS if m in by_name]
    reached = [r for r in tdeq if r["time_to_target_s"] is not None]
    best = (min(reached, key=lambda r: r["time_to_target_s"]) if reached
            else min(tdeq, key=lambda r: r["s_per_epoch"]) if tdeq else None)
    for r in rows:
        for key, ref in (("node", node), ("torchdeq", best)):
            r[f"ratio_{key}_epoch"] = ratio(r["s_per_epoch"], ref and ref["s_per_epoch"])
            r[f"ratio_{key}_target"] = ratio(r["time_to_target_s"],
                                             ref and ref["time_to_target_s"])
        r["torchdeq_best"] = None if best is None else best["model"]
        base = by_name.get(skip_baseline(r["model"]) or "")
        r["ratio_deq_target"] = ratio(r["time_to_target_s"], base and base["time_to_target_s"])
        r["ratio_deq_infer_nfe"] = ratio(r["infer_nfe"], base and base["infer_nfe"])
    return rows


def skip_baseline(model: str) -> str | None:
    """The DEQ(ode) row a skip row is compared with (same ODE method, same multi-scale-ness):
    ``"MS SkipRegDEQ(ode, ptc) paper loss"`` -> ``"MS DEQ(ode, ptc)"``; ``None`` if not a skip
    row."""
    match = re.match(r"(MS )?Skip(?:Reg)?DEQ\(ode, (\w+)\)", model)
    if match is None:
        return None
    return f"{match.group(1) or ''}DEQ(ode, {match.group(2)})"


def _nan_none(v: float) -> float | None:
    return None if math.isnan(v) else v


def _fmt(v: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}{suffix}"


def to_markdown(rows: list[dict[str, Any]], header: str, tasks: list[Task],
                notes: list[str]) -> str:
    """One table per task."""
    lines = [header, ""] + [f"* {n}" for n in notes] + ["", "### Headline", "",
                                                        headline(rows)]
    for task in tasks:
        trows = [r for r in rows if r["task"] == task.name]
        if not trows:
            continue
        r0 = trows[0]
        lines += [f"### {task.name}: {task.description}; {len(task.x_train)} train / "
                  f"{len(task.x_test)} test; target {_fmt(r0['target_acc'], '.1f', '%')}; "
                  f"one f call {r0['f_call_ms']:.3f} ms; torchdeq best: "
                  f"{r0['torchdeq_best'] or '-'}", "",
                  "| model | s/epoch | time to target s | fwd NFE | bwd iters | final acc % "
                  "| infer ms | infer NFE | graph MB | peak CUDA MB | overhead "
                  "| epoch ×NODE | target ×NODE | epoch ×tdeq | target ×tdeq "
                  "| target ×DEQ(ode) | infer NFE ×DEQ(ode) |",
                  "|---|" + "---:|" * 16]
        for r in trows:
            lines.append(
                f"| {r['model']} | {r['s_per_epoch']:.3f} | {_fmt(r['time_to_target_s'])} "
                f"| {r['forward_nfe']:.1f} | {_fmt(r['backward_iterations'], '.1f')} "
                f"| {r['final_acc']:.1f} | {r['infer_ms']:.1f} | {r['infer_nfe']:.1f} "
                f"| {r['graph_mb']:.2f} | {_fmt(r['peak_cuda_mb'], '.1f')} "
                f"| {_fmt(r['overhead'], '.1f')} | {_fmt(r['ratio_node_epoch'])} "
                f"| {_fmt(r['ratio_node_target'])} | {_fmt(r['ratio_torchdeq_epoch'])} "
                f"| {_fmt(r['ratio_torchdeq_target'])} | {_fmt(r['ratio_deq_target'])} "
                f"| {_fmt(r['ratio_deq_infer_nfe'])} |")
        lines.append("")
    return "\n".join(lines)


#: The rows of the ``<name>_key.png`` figure (multi-scale tasks: their ``MS`` versions).
KEY_MODELS = ("NeuralODE", "DEQ(ode, dopri5)", "DEQ(ode, ptc)", "DEQ(ode, ptc) jfb",
              "SkipDEQ(ode, ptc)", "SkipRegDEQ(ode, ptc) paper loss", "DEQ(picard) jfb",
              "torchdeq default", "torchdeq IFT")


def plot(rows: list[dict[str, Any]], tasks: list[Task], out: Path, name: str) -> list[Path]:
    """Accuracy vs cumulative training time (every model; and the :data:`KEY_MODELS` alone),
    and forward NFE per epoch, one panel per task; a model and its multi-scale version share a
    line style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = list(dict.fromkeys(r["model"].removeprefix("MS ") for r in rows))
    # 27 colors: every model of a full run gets its own.
    colors = [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors,
              *plt.get_cmap("Set1").colors]
    style = {n: {"color": colors[i % len(colors)], "marker": ".",
                 "ls": "--" if n.startswith(("torchdeq", "NeuralODE")) else
                 (0, (5, 1, 1, 1)) if i >= 10 else "-"} for i, n in enumerate(roles)}
    paths = []
    for kind, keep in (("accuracy", None), ("key", KEY_MODELS), ("nfe", None)):
        cols = min(len(tasks), 2)
        nrows = -(-len(tasks) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 4.0 * nrows), squeeze=False)
        for ax, task in zip(axes.flat, tasks, strict=False):
            for r in (r for r in rows if r["task"] == task.name):
                role = r["model"].removeprefix("MS ")
                if keep is not None and role not in keep:
                    continue
                hist = r["history"]
                if kind == "nfe":
                    xs = [h["epoch"] + 1 for h in hist]
                    ys = [h["forward_nfe"] for h in hist]
                else:
                    xs = list(itertools.accumulate(h["train_s"] for h in hist))
                    ys = [h["test_acc"] for h in hist]
                ax.plot(xs, ys, label=role, lw=1.3, ms=3, **style[role])
            target = next((r["target_acc"] for r in rows if r["task"] == task.name), None)
            if kind != "nfe" and target is not None:
                ax.axhline(target, color="k", ls=":", lw=1)
                ax.set_ylim(max(ax.get_ylim()[0], target - 25), None)
            ax.set_title(task.name)
            ax.set_xlabel("epoch" if kind == "nfe" else "training wall time (s)")
            ax.set_ylabel("forward NFE / batch" if kind == "nfe" else "test accuracy (%)")
            if kind == "nfe":
                ax.set_yscale("log")
        for ax in list(axes.flat)[len(tasks):]:
            ax.set_visible(False)
        labels = {lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels(),
                                                                strict=True)}
        fig.legend(list(labels.values()), list(labels), loc="lower center", fontsize=8,
                   ncol=min(len(labels), 4), bbox_to_anchor=(0.5, 0.0))
        legend_rows = -(-len(labels) // 4)
        fig.tight_layout(rect=(0, (0.2 * legend_rows + 0.1) / fig.get_figheight(), 1, 1))
        path = out / f"{name}_{kind}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def run(cfg: Config, out: Path = RESULTS, device: str = "cpu",
        checkpoint_dir: Path | None = None, resume: bool = False) -> list[dict[str, Any]]:
    """Run the whole suite; write Markdown, JSON and figures under ``out``; return the rows."""
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out, device, checkpoint_dir, resume)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config, out: Path, device: str, checkpoint_dir: Path | None,
         resume: bool) -> list[dict[str, Any]]:
    notes = []
    models = list(cfg.models)
    skipped = [m for m in models if m in TORCHDEQ_MODELS]
    if skipped and not has_torchdeq():
        models = [m for m in models if m not in TORCHDEQ_MODELS]
        notes.append(f"torchdeq rows skipped (torchdeq not installed): {', '.join(skipped)}; "
                     "install with `pip install -e .[bench]`")
        print(notes[-1], flush=True)
    tasks, rows = [], []
    for tname in cfg.tasks:
        task = load_task(tname, cfg.width[tname], cfg.n_train, cfg.n_test, device)
        tasks.append(task)
        t_f = f_call_time(task, cfg.batch, cfg.seeds[0])
        names = models_for(task, models)
        per_seed = [train_interleaved(task, names, cfg, seed, checkpoint_dir, resume, notes)
                    for seed in cfg.seeds]
        histories = {name: aggregate([runs[name] for runs in per_seed]) for name in names
                     if all(name in runs for runs in per_seed)}
        rows += summarize(task, histories, t_f, cfg)
    notes += [
        "Shared settings: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()
                                        if k not in ("name", "models", "tasks")) + ".",
        f"Shared tolerances: forward atol = rtol = {TOL['tol']:g} (ODE integrator "
        f"{TOL['ode_tol']:g}; NeuralODE rtol = atol = {TOL['ode_tol']:g}, t_end = 1), backward "
        f"tol {TOL['backward_tol']:g}; max steps {TOL['ode_max_steps']} (ODE) / "
        f"{TOL['fp_max_steps']} (fixed point) / {TOL['backward_max_steps']} (backward). "
        "torchdeq default keeps its own (fixed-point iteration, 40 iterations, abs tol 1e-3, "
        "1-step gradient); torchdeq IFT uses the shared relative tolerances.",
        "f is the same module class and initial weights for every model, its z-weight's "
        "spectral norm capped at 0.9 (conv: reshaped kernel at 0.3, operator norm <= 0.9; "
        "multi-scale: each of the four scale-to-scale maps at operator norm 0.45, joint <= 0.9); "
        "Adam; cross-entropy + contdeq.aux_loss (skip terms).",
        "Target = NeuralODE (backprop; MS NeuralODE on images-multiscale, where ×NODE is against "
        "it) final accuracy - 0.5 point; time to target = cumulative "
        "training time (evaluation excluded) at the first epoch reaching it; '-' = not reached.",
        "bwd iters: VJPs of the implicit linear solve (0 for jfb and torchdeq's 1-step "
        "gradient), f calls of the adjoint ODE; '-' for backprop through the solver. "
        "overhead = training time per batch / ((fwd NFE + bwd iters) × one f call).",
        "graph MB: bytes held by the autograd graph of a training forward (the first batch of each "
        "epoch, measured outside the timed steps; max over epochs).",
        "Skip rows: the library's skip term (skip_weight 1, L2, stop-gradient at z*); 'paper "
        "loss' rows: the paper's (5 · mean|z0 − z*|, gradient reaching z*). ×DEQ(ode): time "
        "to target and inference NFE against the DEQ(ode) row of the same method.",
        "Models train interleaved epoch by epoch (a drift in machine speed reaches all alike); "
        "timings on a shared machine are still noisy.",
    ]
    header = (f"## Paper benchmark `{cfg.name}` ({machine_header()}, device {device}; "
              f"means over seeds {list(cfg.seeds)})")
    out.mkdir(parents=True, exist_ok=True)
    write_results(cfg.name, to_markdown(rows, header, tasks, notes), rows, out=out)
    for path in plot(rows, tasks, out, cfg.name):
        print(f"written {path}")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced run (< 2 minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    parser.add_argument("--models", nargs="+", choices=ALL_MODELS, default=None)
    parser.add_argument("--tol", type=float, default=None,
                        help=f"shared forward/backward tolerance (default {TOL['tol']:g}; "
                             "ODE integrators 10x tighter)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 for --quick/--smoke)")
    add_device_argument(parser)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="save a checkpoint per model and epoch here")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoints in --checkpoint-dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.resume and args.checkpoint_dir is None:
        raise SystemExit("--resume needs --checkpoint-dir")
    preset = "quick" if args.quick else "smoke" if args.smoke else "full"
    cfg = replace(Config(), **PRESETS[preset])
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.seeds is not None:
        cfg.seeds = tuple(args.seeds)
    if args.threads is not None:
        cfg.threads = args.threads
    if args.tasks is not None:
        cfg.tasks = tuple(args.tasks)
    if args.models is not None:
        cfg.models = tuple(args.models)
    saved = dict(TOL)
    if args.tol is not None:
        set_tolerance(args.tol)
    try:
        return run(cfg, args.out, args.device, args.checkpoint_dir, args.resume)
    finally:
        TOL.update(saved)


if __name__ == "__main__":
    warnings.filterwarnings("once")
    main()
