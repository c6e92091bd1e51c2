"""Paper benchmark: train every layer kind on the same tasks, in one process, and compare
(benchmarks/README.md). Also renders the headline of a results JSON: ``--headline JSON``."""

from __future__ import annotations

import itertools
import json
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .common import (
    AUTOCAST,
    MODELS,
    MULTISCALE_MODELS,
    OPTIONAL_MODELS,
    PRESETS,
    RESULTS,
    TASKS,
    TOL,
    Config,
    Task,
    fmt,
    has_torchdeq,
    load_task,
    machine_header,
    make_parser,
    models_for,
    ratio,
    set_tolerance,
    table,
    threads,
    train_task,
    write_results,
)

ALL_MODELS = (*MODELS, *MULTISCALE_MODELS)
DEFAULT_MODELS = tuple(m for m in ALL_MODELS if m not in OPTIONAL_MODELS)


# -- the headline: the goals, read off one task's rows --------------------------------
Row = dict[str, Any]


def _to_target(reference: Row, row: Row) -> float | None:
    """Speed-up of ``row`` over ``reference`` in time to the target accuracy."""
    return ratio(reference["time_to_target_s"], row["time_to_target_s"])


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}×"


def _best(rows: list[Row], key: str = "time_to_target_s") -> Row | None:
    timed = [r for r in rows if r.get(key) is not None]
    return min(timed, key=lambda r: r[key]) if timed else None


def _pair(by: dict[str, Row], ours: str, theirs: str) -> str:
    """``epoch a× / target b×`` speed-up of ``ours`` over ``theirs``."""
    a, b = by.get(ours), by.get(theirs)
    if a is None or b is None:
        return "-"
    return f"{_x(ratio(b['s_per_epoch'], a['s_per_epoch']))} / {_x(_to_target(b, a))}"


def task_headline(rows: list[Row]) -> dict[str, str]:
    """The headline cells of one task's rows."""
    by = {r["model"]: r for r in rows}
    ms = "MS " if any(m.startswith("MS ") for m in by) else ""
    node = by.get(f"{ms}NeuralODE")
    node_t = node and node["time_to_target_s"]
    deq = {label: ratio(node_t, by[f"{ms}{m}"]["time_to_target_s"])
           for label, m in (("ptc", "DEQ(ode, ptc)"), ("dopri5", "DEQ(ode, dopri5)"),
                            ("ptc jfb", "DEQ(ode, ptc) jfb")) if f"{ms}{m}" in by}
    skips = [r for r in rows if r.get("ratio_deq_target") is not None]
    best_skip = min(skips, key=lambda r: r["ratio_deq_target"]) if skips else None
    skip_nfe = [r for r in rows if r["model"].startswith(f"{ms}SkipDEQ")
                and r.get("ratio_deq_infer_nfe") is not None
                and r.get("time_to_target_s") is not None]
    best_nfe = min(skip_nfe, key=lambda r: r["ratio_deq_infer_nfe"]) if skip_nfe else None
    tdeq = [r for r in rows if r["model"].startswith("torchdeq")]
    ours = [r for r in rows if not r["model"].startswith(("torchdeq", "NeuralODE", "MS Neural"))]
    best_ours, best_tdeq = _best(ours), _best(tdeq)
    return {
        "task": rows[0]["task"],
        "DEQ(ode) vs NODE": ", ".join(f"{label} {_x(v)}" for label, v in deq.items()) or "-",
        "best skip vs DEQ(ode)": (f"{best_skip['model'].removeprefix(ms)} "
                                  f"{_x(1 / best_skip['ratio_deq_target'])}" if best_skip
                                  else "-"),
        "SkipDEQ infer NFE ×DEQ(ode)": (
            f"{best_nfe['ratio_deq_infer_nfe']:.2f} {best_nfe['model'].removeprefix(ms)}"
            if best_nfe else "-"),
        "picard jfb vs torchdeq default (epoch / target)": _pair(by, "DEQ(picard) jfb",
                                                                 "torchdeq default"),
        "picard IFT vs torchdeq IFT (epoch / target)": _pair(by, "DEQ(picard)", "torchdeq IFT"),
        "contdeq best vs torchdeq best": (
            f"{best_ours['model']} {_x(_to_target(best_tdeq, best_ours))}"
            if best_ours and best_tdeq else "-"),
    }


def headline(rows: list[Row]) -> str:
    """Markdown table, one line per task."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cells = [task_headline([r for r in rows if r["task"] == t]) for t in tasks]
    if not cells:
        return ""
    return table(" | ".join(cells[0]), (c.values() for c in cells))



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
        cells = ((r["model"], f"{r['s_per_epoch']:.3f}", fmt(r["time_to_target_s"]),
                  f"{r['forward_nfe']:.1f}", fmt(r["backward_iterations"], ".1f"),
                  f"{r['final_acc']:.1f}", f"{r['infer_ms']:.1f}", f"{r['infer_nfe']:.1f}",
                  fmt(r["graph_mb"]), fmt(r["peak_cuda_mb"], ".1f"), fmt(r["overhead"], ".1f"),
                  *(fmt(r[k]) for k in ("ratio_node_epoch", "ratio_node_target",
                                        "ratio_torchdeq_epoch", "ratio_torchdeq_target",
                                        "ratio_deq_target", "ratio_deq_infer_nfe"))) for r in trows)
        lines.append(table(
            "model | s/epoch | time to target s | fwd NFE | bwd iters | final acc % | infer ms | "
            "infer NFE | graph MB | peak CUDA MB | overhead | epoch ×NODE | target ×NODE | epoch "
            "×tdeq | target ×tdeq | target ×DEQ(ode) | infer NFE ×DEQ(ode)", cells, "l" + "r" * 16,
            [f"### {task.name}: {task.description}; {len(task.x_train)} train / "
             f"{len(task.x_test)} test; target {fmt(r0['target_acc'], '.1f', '%')}; one f call "
             f"{r0['f_call_ms']:.3f} ms; torchdeq best: {r0['torchdeq_best'] or '-'}", ""]))
    return "\n".join(lines)


def profile_table(rows: list[Row]) -> str:
    """``--profile``: each row's training step in its last epoch split into ``common.PARTS``
    (medians, ms); for the DEQ rows, the step a perfect initial guess would give (the forward
    solve cut to one ``f`` call) and the bound step / perfect guess on any guess's speed-up."""
    base = {r["task"]: r["history"][-1]["step_ms"] for r in rows
            if r["model"].removeprefix("MS ") == "DEQ(ode, ptc)"}
    cells = []
    for r in rows:
        h, nfe = r["history"][-1], r["history"][-1]["median_forward_nfe"]
        guess = (h["step_ms"] - h["forward_solve_ms"] * (1 - 1 / nfe)
                 if "DEQ(" in r["model"] and nfe >= 1 else None)
        cells.append((r["task"], r["model"], f"{h['step_ms']:.2f}",
                      f"{h['forward_solve_ms']:.2f} ({nfe:.0f})", f"{h['forward_rest_ms']:.2f}",
                      f"{h['backward_solve_ms']:.2f} ({h['median_backward_iterations']:.0f})",
                      f"{h['backward_rest_ms']:.2f}", f"{h['optimizer_ms']:.2f}",
                      fmt(ratio(base.get(r["task"]), h["step_ms"])),
                      "- | -" if guess is None else f"{guess:.2f} | {h['step_ms'] / guess:.2f}×"))
    return table("task | model | step ms | fwd solve ms (NFE) | fwd rest ms | bwd solve ms (iters) "
                 "| bwd rest ms | optimizer ms | DEQ(ode, ptc) step ÷ this | perfect guess ms | "
                 "bound", cells, "llrrrrrrrrr",
                 ["### Step profile: the last epoch's training steps (medians)", ""])


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
        checkpoint_dir: Path | None = None, resume: bool = False, profile: bool = False
        ) -> list[dict[str, Any]]:
    """Run the whole suite; write Markdown (with :func:`profile_table` if ``profile``), JSON and
    figures under ``out``; return the rows."""
    notes = []
    models = list(cfg.models or DEFAULT_MODELS)
    skipped = [m for m in models if m.startswith("torchdeq")]
    if skipped and not has_torchdeq():
        models = [m for m in models if m not in skipped]
        notes.append(f"torchdeq rows skipped (torchdeq not installed): {', '.join(skipped)}; "
                     "install with `pip install -e .[bench]`")
        print(notes[-1], flush=True)
    tasks, rows = [], []
    with threads(cfg.threads):
        for tname in cfg.tasks:
            tasks.append(load_task(tname, cfg.width[tname], cfg.n_train, cfg.n_test, device))
            rows += train_task(tasks[-1], models_for(tasks[-1], models), cfg, notes,
                               checkpoint_dir, resume)
        header = (f"## Paper benchmark `{cfg.name}` ({machine_header()}, device {device}; "
                  f"means over seeds {list(cfg.seeds)})")
    notes += [
        "Shared settings: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()
                                        if k not in ("name", "models", "tasks")) + ".",
        f"Shared tolerances: forward atol = rtol = {TOL['tol']:g} (ODE integrator "
        f"{TOL['ode_tol']:g}; NeuralODE rtol = atol = {TOL['ode_tol']:g}, t_end = 1), backward "
        f"tol {TOL['backward_rtol']:g}; max steps {TOL['ode_max_steps']} (ODE) / "
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
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows, header, tasks, notes)
    write_results(cfg.name, markdown + ("\n" + profile_table(rows) if profile else ""), rows, out)
    for path in plot(rows, tasks, out, cfg.name):
        print(f"written {path}")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = make_parser(__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced run (< 2 minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    parser.add_argument("--models", nargs="+", choices=ALL_MODELS, default=None)
    parser.add_argument("--name", default=None, help="results name (default: the preset's)")
    parser.add_argument("--profile", action="store_true",
                        help="add the table of the last epoch's step parts (step_profile.md)")
    parser.add_argument("--autocast", choices=("bfloat16", "float16"), default=None,
                        help="also train every model under torch.autocast to this dtype")
    parser.add_argument("--tol", type=float, default=None,
                        help=f"shared forward/backward tolerance (default {TOL['tol']:g}; "
                             "ODE integrators 10x tighter)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 for --quick/--smoke)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="save a checkpoint per model and epoch here")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoints in --checkpoint-dir")
    parser.add_argument("--headline", type=Path, default=None, metavar="JSON",
                        help="only render the headline of a results JSON to <stem>_headline.md")
    args = parser.parse_args(argv)
    if args.headline is not None:
        path = args.headline.with_name(f"{args.headline.stem}_headline.md")
        path.write_text(headline(json.loads(args.headline.read_text())))
        print(path.read_text())
        return []
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume needs --checkpoint-dir")
    cfg = replace(Config(), **PRESETS["quick" if args.quick else "smoke" if args.smoke
                                      else "full"])
    for key in ("name", "epochs", "threads"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    for key in ("seeds", "tasks", "models"):
        if getattr(args, key) is not None:
            setattr(cfg, key, tuple(getattr(args, key)))
    if args.autocast is not None:
        models = cfg.models or DEFAULT_MODELS
        cfg.models = (*models, *(f"{m}{AUTOCAST}{args.autocast}" for m in models))
    saved = dict(TOL)
    if args.tol is not None:
        set_tolerance(args.tol)
    try:
        return run(cfg, args.out, args.device, args.checkpoint_dir, args.resume, args.profile)
    finally:
        TOL.update(saved)


if __name__ == "__main__":
    warnings.filterwarnings("once")
    main()
