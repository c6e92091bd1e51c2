"""JIIO benchmark: joint inference (discrete and continuous) against the nested loop, cold-
and warm-started, on the four applications of ``examples/jiio_tasks.py``, over seeds.

``python -m benchmarks.jiio --help``; benchmarks/README.md describes it."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import contdeq
from contdeq.jiio import joint_inference, nested_inference
from contdeq.solvers import NonFiniteError
from examples.jiio_tasks import (
    ATTACK_SOLVER,
    ATTACK_STEP,
    LATENT_STEP,
    TOLERANCE,
    Classifier,
    Decoder,
    corrupt,
    digits_split,
    psnr,
    threat,
    train_classifier,
    train_decoder,
)

from .common import ci_text, machine_header, make_parser, table, write_results

METHODS = ("nested-cold", "nested-warm", "jiio", "jiio-ode")
#: The converged DEQ solve that measures an input's objective afterwards (untimed).
CONVERGED = contdeq.ForwardSolver("anderson", atol=1e-6, rtol=1e-6, max_steps=300)


class Counted(nn.Module):
    """Counts the calls of a cell (``f`` evaluations, forward only)."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell
        self.calls = 0

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        return self.cell(z, x)


@dataclass
class Application:
    """One input-optimization problem: the cell, objective, start, step and projection."""

    name: str
    cell: nn.Module
    objective: object
    x0: Tensor
    z0: Tensor
    step: float
    project: object
    naive_steps: int
    joint_steps: int
    joint_solver: str
    quality: object  # (z, x) -> (name, value)
    objective_on: object  # (x_batch (S*B, ...)) -> objective builder for tiled targets


def latent_application(name: str, decoder: Decoder, clean: Tensor, steps: int,
                       joint_steps: int, seed: int) -> Application:
    observed, mask = corrupt(clean, name, seed) if name != "reconstruct" else (clean, None)
    x0, z0 = decoder.starts(len(clean))

    def quality(z: Tensor, x: Tensor) -> tuple[str, float]:
        image = decoder.render(z)
        if name == "reconstruct":
            return "MSE", float(((image - clean) ** 2).mean())
        return "PSNR dB", psnr(image, clean)

    def objective_on(repeats: int) -> object:
        tiled_mask = None if mask is None else mask.repeat(repeats, 1)
        return decoder.objective(observed.repeat(repeats, 1), tiled_mask)

    return Application(name, decoder.cell, decoder.objective(observed, mask), x0, z0,
                       LATENT_STEP, None, steps, joint_steps, "anderson", quality,
                       objective_on)


def attack_application(model: Classifier, images: Tensor, labels: Tensor, eps: float,
                       steps: int, joint_steps: int) -> Application:
    def quality(z: Tensor, x: Tensor) -> tuple[str, float]:
        return "robust acc", float((model.head(z).argmax(1) == labels).float().mean())

    return Application("adversarial", model.cell, model.attack_objective(labels), images,
                       torch.zeros(len(images), model.width), ATTACK_STEP,
                       threat(images, eps), steps, joint_steps, ATTACK_SOLVER, quality,
                       lambda repeats: model.attack_objective(labels.repeat(repeats)))


def run(app: Application, method: str) -> dict:
    """One run; returns the timeline ``(seconds, f calls, x)`` and the final ``(z, x)``."""
    cell = Counted(app.cell)
    timeline: list[tuple[float, int, Tensor]] = []
    start = time.perf_counter()

    def record(z: Tensor, x: Tensor) -> None:
        timeline.append((time.perf_counter() - start, cell.calls, x.clone()))

    tol = {"atol": TOLERANCE, "rtol": TOLERANCE}
    jvps = 0
    if method.startswith("nested"):
        z, x, stats = nested_inference(
            cell, app.objective, app.x0, app.z0, steps=app.naive_steps, step_size=app.step,
            project=app.project, solver=contdeq.ForwardSolver("anderson", **tol),
            warm_start=method == "nested-warm", callback=record)
    else:
        ode = method == "jiio-ode"
        options = {"method": "implicit_ptc"} if ode else {}
        try:
            z, x, stats = joint_inference(
                cell, app.objective, app.x0, app.z0, solver="ode" if ode else app.joint_solver,
                step_sizes=app.step, project=app.project, atol=1e-4, rtol=1e-4,
                max_steps=app.joint_steps, on_nonconvergence="ignore", callback=record,
                **options)
        except NonFiniteError:  # recorded as a failure; the finite inputs it reached kept
            finite = [bool(torch.isfinite(x).all()) for _, _, x in timeline]
            del timeline[finite.index(False) if False in finite else len(timeline):]
            x = timeline[-1][2] if timeline else app.x0
            return {"timeline": timeline, "z": None, "x": x, "failed": True,
                    "seconds": time.perf_counter() - start, "f_calls": cell.calls,
                    "vjps": 0, "jvps": 0}
        jvps = stats.solver.jvps or 0
    seconds = time.perf_counter() - start
    return {"timeline": timeline, "z": z, "x": x, "seconds": seconds, "f_calls": cell.calls,
            "vjps": stats.vjps, "jvps": jvps, "failed": False}


def true_objectives(app: Application, xs: list[Tensor]) -> Tensor:
    """Mean objective at each recorded input, with a converged DEQ solve (one batched solve)."""
    batch = xs[0].shape[0]
    stacked = torch.cat(xs)
    with torch.no_grad():
        z, _ = contdeq.equilibrium(app.cell, stacked, app.z0.repeat(len(xs), 1), solver=CONVERGED)
        values = app.objective_on(len(xs))(z, stacked)
    return values.reshape(len(xs), batch).mean(1)


def summarize(app: Application, method: str, result: dict, target: float) -> dict:
    values = true_objectives(app, [x for _, _, x in result["timeline"]])
    reached = (values <= target + 1e-6 * abs(target)).nonzero()
    with torch.no_grad():
        z, _ = contdeq.equilibrium(app.cell, result["x"], app.z0, solver=CONVERGED)
        final = float(app.objective(z, result["x"]).mean())
    metric, quality = app.quality(z, result["x"])
    label = {"jiio": f"jiio ({app.joint_solver})",
             "jiio-ode": "jiio-ode (implicit_ptc)"}.get(method, method)
    row = {"application": app.name, "method": label, "key": method, "failed": result["failed"],
           "final_objective": final,
           "target": target, "metric": metric, "quality": quality,
           "total_seconds": result["seconds"], "total_f_calls": result["f_calls"],
           "total_vjps": result["vjps"], "total_jvps": result["jvps"],
           "seconds_to_target": None, "f_calls_to_target": None,
           "curve": [(t, float(v)) for (t, _, _), v in zip(result["timeline"], values,
                                                           strict=True)]}
    if len(reached):
        i = int(reached[0])
        row["seconds_to_target"] = result["timeline"][i][0]
        row["f_calls_to_target"] = result["timeline"][i][1]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny run (tests)")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.device.type != "cpu":
        parser.error(f"--device {args.device}: not supported here; the decoder, classifier and "
                     "their training come from the examples' task module "
                     "(examples/jiio_tasks.py), which build their tensors on the CPU")
    if not 1 <= args.seeds <= 10:
        parser.error(f"--seeds must be in 1..10, got {args.seeds}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    quiet = (lambda message: None) if args.quick else print
    x_train, x_test, y_train, y_test = digits_split()
    batch, dec_epochs, clf_epochs = (8, 1, 1) if args.quick else (64, 8, 6)
    latent_steps, attack_steps, joint_steps = (3, 3, 20) if args.quick else (100, 30, 300)
    decoder = Decoder()
    train_decoder(decoder, x_train[:64] if args.quick else x_train, dec_epochs, log=quiet)
    model = Classifier()
    train_classifier(model, x_train[:64] if args.quick else x_train, y_train, clf_epochs,
                     adversary=None, eps=0.1, log=quiet)
    decoder.requires_grad_(False)
    model.requires_grad_(False)
    rows = []
    for seed in range(args.seeds):
        part = slice(seed * batch, (seed + 1) * batch)
        apps = [latent_application(name, decoder, x_test[part], latent_steps, joint_steps, seed)
                for name in ("reconstruct", "denoise", "inpaint")]
        apps.append(attack_application(model, x_test[part], y_test[part], 0.1, attack_steps,
                                       joint_steps))
        for app in apps:
            results = {method: run(app, method) for method in METHODS}
            quiet(f"seed {seed} {app.name}: done")
            with torch.no_grad():  # the looser of the two loops' final objectives
                target = float(true_objectives(
                    app, [results[m]["x"] for m in ("nested-warm", "nested-cold")]).max())
            seed_rows = [summarize(app, method, results[method], target) for method in METHODS]
            for row in seed_rows:
                row["seed"] = seed
                for base in ("nested-warm", "nested-cold"):
                    ref = next(r for r in seed_rows if r["key"] == base)
                    for what in ("seconds", "f_calls"):
                        mine, theirs = row[f"{what}_to_target"], ref[f"{what}_to_target"]
                        row[f"{what}_ratio_{base}"] = (None if mine is None or theirs is None
                                                       else theirs / mine)
            rows.extend(seed_rows)
    write_results("jiio_quick" if args.quick else "jiio", to_markdown(rows, args),
                  [{k: v for k, v in r.items() if k != "curve"} for r in rows], args.out)
    plot([r for r in rows if r["seed"] == 0],
         args.out / ("jiio_quick.png" if args.quick else "jiio.png"))


def interval(values: list[float | None]) -> str:
    """``mean ± half-width`` of a 95% t-interval over seeds; ``not reached (k/n)`` if some
    seed never reached the target."""
    missing = sum(v is None for v in values)
    return f"not reached ({missing}/{len(values)})" if missing else ci_text(values, suffix="x")


def to_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    def fmt(value: object, spec: str, unit: str = "") -> str:
        return "not reached" if value is None else format(value, spec) + unit

    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# JIIO against the nested loop (cold- and warm-started)",
        "",
        f"{machine_header()}; {len(seeds)} seeds (each a different batch of held-out images "
        "and corruption; one run each), on a machine shared with other jobs (times noisy; f "
        "calls exact). Target: the higher of the two nested loops' final objectives. Ratios: "
        "the loop's time or f calls to the target over the method's, mean ± 95% t-interval "
        "half-width over seeds.",
        "",
    ]
    cells = []
    for app in dict.fromkeys(r["application"] for r in rows):
        for method in METHODS:
            group = [r for r in rows if r["application"] == app and r["key"] == method]
            first = group[0]
            cells.append((
                app, first["method"],
                *(interval([r[f"{k}_ratio_nested-{loop}"] for r in group])
                  for loop in ("warm", "cold") for k in ("f_calls", "seconds")),
                ", ".join("NaN/Inf" if r["failed"] else fmt(r["f_calls_to_target"], "d")
                          for r in group),
                ", ".join(str(r["total_jvps"]) for r in group),
                f"{first['final_objective']:.4f}", f"{first['metric']} {first['quality']:.4f}"))
    return table("application | method | f-call ratio vs warm | time ratio vs warm | f-call "
                 "ratio vs cold | time ratio vs cold | f calls to target (per seed) | JVPs (per "
                 "seed) | final objective (seed 0) | quality (seed 0)", cells, head=lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["application"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4))
    for ax, name in zip(axes, names, strict=True):
        for r in (r for r in rows if r["application"] == name):
            t, v = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
            ax.plot(t, v, label=r["method"])
            ax.axhline(r["target"], color="grey", lw=0.5, ls=":")
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("wall time (s)")
    axes[0].set_ylabel("mean objective")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"written {path}")


if __name__ == "__main__":
    main()
