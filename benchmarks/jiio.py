"""JIIO benchmark: joint inference (discrete and continuous) against the naive nested loop and
unrolled differentiation, on the four applications of ``examples/jiio_tasks.py``.

Applications (scikit-learn digits): reconstructing held-out images with a generative DEQ
decoder trained by latent optimization, denoising (sigma 0.3) and inpainting (a hidden 4x4
square) with that decoder, and an L∞ attack (eps 0.1, box [0, 1]) on a DEQ classifier.

Methods, all with the same input step ``alpha`` (plain projected gradient steps):

* ``naive``: ``nested_inference``: each step an Anderson DEQ solve + implicit backward;
* ``unrolled``: the same loop, each step a Picard solve backpropagated through its iterations;
* ``jiio``: ``joint_inference`` on the augmented state, by Anderson (its defaults here: memory
  20, damping 0.5) for the latent
  tasks and by Picard for the attack (the projection's corners stall Anderson);
* ``jiio-ode``: ``joint_inference(solver="ode")``, the augmented ODE's steady state (bosh3). Its
  ``alpha`` is a time scale: for the latent tasks 0.1 (with the loop's 0.5 the input flow
  outpaces the adjoint and the ODE oscillates), for the attack the loop's.

The joint solves run to ``atol = rtol = 1e-4`` (or their step cap); the nested loops' DEQ
solves to ``1e-3``, their implicit backward to the default ``1e-4``.

The target is the naive loop's final objective; reported per method: wall time and ``f``
calls until the objective at its current input reaches the target (the objective of each
recorded input is measured afterwards, untimed, with a converged DEQ solve), the speed-up over
the naive loop, and the final quality (MSE, PSNR, robust accuracy). Methods and applications
are interleaved, every run repeated ``--repeats`` times; times are the fastest repeat.

Usage: ``python benchmarks/jiio.py [--quick] [--repeats 2] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import contdeq
from contdeq.jiio import joint_inference, nested_inference

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from common import RESULTS, add_device_argument, machine_header, write_results
from jiio_tasks import (
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

METHODS = ("naive", "unrolled", "jiio", "jiio-ode")
#: The input step of the continuous variant on the latent tasks (see above).
LATENT_ODE_STEP = 0.1


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
    ode_step: float
    quality: object  # (z, x) -> (name, value)
    objective_on: object  # (x_batch (S*B, ...)) -> objective builder for tiled targets


def latent_application(name: str, decoder: Decoder, clean: Tensor, steps: int,
                       joint_steps: int) -> Application:
    observed, mask = corrupt(clean, name) if name != "reconstruct" else (clean, None)
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
                       LATENT_STEP, None, steps, joint_steps, "anderson", LATENT_ODE_STEP,
                       quality, objective_on)


def attack_application(model: Classifier, images: Tensor, labels: Tensor, eps: float,
                       steps: int, joint_steps: int) -> Application:
    def quality(z: Tensor, x: Tensor) -> tuple[str, float]:
        return "robust acc", float((model.head(z).argmax(1) == labels).float().mean())

    return Application("adversarial", model.cell, model.attack_objective(labels), images,
                       torch.zeros(len(images), model.width), ATTACK_STEP,
                       threat(images, eps), steps, joint_steps, ATTACK_SOLVER, ATTACK_STEP,
                       quality,
                       lambda repeats: model.attack_objective(labels.repeat(repeats)))


def run(app: Application, method: str) -> dict:
    """One run; returns the timeline ``(seconds, f calls, x)`` and the final ``(z, x)``."""
    cell = Counted(app.cell)
    timeline: list[tuple[float, int, Tensor]] = []
    start = time.perf_counter()

    def record(z: Tensor, x: Tensor) -> None:
        timeline.append((time.perf_counter() - start, cell.calls, x.clone()))

    tol = {"atol": TOLERANCE, "rtol": TOLERANCE}
    vjps = 0
    if method in ("naive", "unrolled"):
        solver = (contdeq.ForwardSolver("anderson", **tol) if method == "naive" else
                  contdeq.ForwardSolver("picard", **tol, max_steps=200))
        z, x, stats = nested_inference(
            cell, app.objective, app.x0, app.z0, steps=app.naive_steps, step_size=app.step,
            project=app.project, solver=solver,
            backward="implicit" if method == "naive" else "unrolled", callback=record)
        vjps = stats.vjps
    else:
        ode = method == "jiio-ode"
        options = {"method": "bosh3"} if ode else {}
        z, x, stats = joint_inference(
            cell, app.objective, app.x0, app.z0, solver="ode" if ode else app.joint_solver,
            step_sizes=app.ode_step if ode else app.step, project=app.project, atol=1e-4,
            rtol=1e-4, max_steps=app.joint_steps, on_nonconvergence="ignore", callback=record,
            **options)
        vjps = stats.vjps
    seconds = time.perf_counter() - start
    return {"timeline": timeline, "z": z, "x": x, "seconds": seconds, "f_calls": cell.calls,
            "vjps": vjps}


def true_objectives(app: Application, xs: list[Tensor]) -> Tensor:
    """Mean objective at each recorded input, with a converged DEQ solve (one batched solve)."""
    batch = xs[0].shape[0]
    stacked = torch.cat(xs)
    with torch.no_grad():
        z, _ = contdeq.equilibrium(
            app.cell, stacked, app.z0.repeat(len(xs), 1),
            solver=contdeq.ForwardSolver("anderson", atol=1e-6, rtol=1e-6, max_steps=300))
        values = app.objective_on(len(xs))(z, stacked)
    return values.reshape(len(xs), batch).mean(1)


def summarize(app: Application, method: str, result: dict, target: float) -> dict:
    values = true_objectives(app, [x for _, _, x in result["timeline"]])
    reached = (values <= target + 1e-6 * abs(target)).nonzero()
    with torch.no_grad():
        z, _ = contdeq.equilibrium(app.cell, result["x"], app.z0,
                                   solver=contdeq.ForwardSolver("anderson", atol=1e-6,
                                                                rtol=1e-6, max_steps=300))
        final = float(app.objective(z, result["x"]).mean())
    metric, quality = app.quality(z, result["x"])
    label = {"jiio": f"jiio ({app.joint_solver})",
             "jiio-ode": f"jiio-ode (bosh3, alpha {app.ode_step:g})"}.get(method, method)
    row = {"application": app.name, "method": label, "final_objective": final,
           "target": target, "metric": metric, "quality": quality,
           "total_seconds": result["seconds"], "total_f_calls": result["f_calls"],
           "total_vjps": result["vjps"], "seconds_to_target": None, "f_calls_to_target": None,
           "curve": [(t, float(v)) for (t, _, _), v in zip(result["timeline"], values,
                                                           strict=True)]}
    if len(reached):
        i = int(reached[0])
        row["seconds_to_target"] = result["timeline"][i][0]
        row["f_calls_to_target"] = result["timeline"][i][1]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (tests)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    add_device_argument(parser)
    args = parser.parse_args(argv)
    if args.device.type != "cpu":
        parser.error(f"--device {args.device}: not supported here; the decoder, classifier and "
                     "their training come from the examples' task module "
                     "(examples/jiio_tasks.py), which build their tensors on the CPU")
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
    apps = [latent_application(name, decoder, x_test[:batch], latent_steps, joint_steps)
            for name in ("reconstruct", "denoise", "inpaint")]
    apps.append(attack_application(model, x_test[:batch], y_test[:batch], 0.1, attack_steps,
                                   joint_steps))
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for app in apps:
            for method in METHODS:
                results.setdefault((app.name, method), []).append(run(app, method))
    rows = []
    for app in apps:
        naive = results[(app.name, "naive")][0]
        with torch.no_grad():
            target = float(true_objectives(app, [naive["x"]])[0])
        for method in METHODS:
            runs = [summarize(app, method, r, target) for r in results[(app.name, method)]]
            row = min(runs, key=lambda r: r["seconds_to_target"] or float("inf"))
            row["repeats"] = len(runs)
            rows.append(row)
    for app in apps:
        base = next(r for r in rows if r["application"] == app.name and r["method"] == "naive")
        for row in (r for r in rows if r["application"] == app.name):
            t = row["seconds_to_target"]
            row["speedup"] = None if t is None else base["seconds_to_target"] / t
            row["f_call_ratio"] = (None if row["f_calls_to_target"] is None else
                                   base["f_calls_to_target"] / row["f_calls_to_target"])
    write_results("jiio_quick" if args.quick else "jiio", to_markdown(rows, args),
                  [{k: v for k, v in r.items() if k != "curve"} for r in rows], args.out)
    plot(rows, args.out / ("jiio_quick.png" if args.quick else "jiio.png"))


def to_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    def fmt(value: object, spec: str, unit: str = "") -> str:
        return "not reached" if value is None else format(value, spec) + unit

    lines = [
        "# JIIO against the nested loop and unrolled differentiation",
        "",
        f"{machine_header()}; fastest of {args.repeats} interleaved repeats, on a machine "
        "shared with other jobs (noisy). Target: the naive loop's final objective. Time and f "
        "calls are until the objective at the method's current input reaches the target.",
        "",
        "| application | method | s to target | f calls to target | speed-up (time) | "
        "f-call ratio | final objective | quality | total s | total f calls | total VJPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['application']} | {r['method']} | {fmt(r['seconds_to_target'], '.3f')} | "
            f"{fmt(r['f_calls_to_target'], 'd')} | {fmt(r['speedup'], '.1f', 'x')} | "
            f"{fmt(r['f_call_ratio'], '.1f', 'x')} | {r['final_objective']:.4f} | "
            f"{r['metric']} {r['quality']:.4f} | {r['total_seconds']:.2f} | "
            f"{r['total_f_calls']} | {r['total_vjps']} |")
    return "\n".join(lines) + "\n"


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
