"""Federated DEQs on Flower: rounds and bytes to a target accuracy, weighted fusion vs FedAvg,
DEQ vs an explicit network, mixed vs all-strong clients.

Every configuration is one run of ``contdeq.federated.run_federated`` (Flower's simulation
engine) on the same non-IID shards (``examples/federated_digits.py``: Dirichlet split, weak
clients with 4 solver steps at tolerance 0.1, strong ones with 60 steps at 1e-3):

* ``deq weighted mixed``: the DEQ, quality-weighted fusion, half the clients weak;
* ``deq fedavg mixed``: the same with Flower's FedAvg;
* ``mlp fedavg``: an explicit three-layer network (more parameters; solver budgets do not
  apply) with FedAvg;
* ``deq weighted strong`` / ``deq fedavg strong``: the DEQ with every client strong.

After every round the server evaluates the global model on a held-out test set; bytes are the
parameter records carried both ways (``FederatedRun.bytes_sent``). Configurations run in turn
for each seed (one shared machine: the figures are accuracy and bytes, not times).

Usage: ``python benchmarks/federated.py [--datasets digits procedural] [--seeds 0 1]
[--rounds 12] [--append]``; writes ``benchmarks/results/federated.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from flwr.serverapp.strategy import FedAvg

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from common import RESULTS, add_device_argument, machine_header, write_results
from federated_digits import budgets, make_task, model_factory

from contdeq.federated import QualityWeightedFedAvg, run_federated

#: name -> (model, strategy, clients weak out of --clients: "mixed" = half, "strong" = none)
CONFIGS = {
    "deq weighted mixed": ("deq", "weighted", "mixed"),
    "deq fedavg mixed": ("deq", "fedavg", "mixed"),
    "mlp fedavg": ("mlp", "fedavg", "mixed"),
    "deq weighted strong": ("deq", "weighted", "strong"),
    "deq fedavg strong": ("deq", "fedavg", "strong"),
}
#: Target test accuracy per dataset (procedural: no model reaches 0.6 in 12 rounds here).
TARGETS = {"digits": 0.85, "procedural": 0.3}


def run_config(name: str, dataset: str, seed: int, args: argparse.Namespace) -> dict:
    """One federated run; the row of the JSON output."""
    model, fusion, mix = CONFIGS[name]
    task = make_task(dataset, args.clients, args.alpha, seed)
    options = {"fraction_evaluate": 0.0, "min_train_nodes": args.clients,
               "min_available_nodes": args.clients}
    strategy = (QualityWeightedFedAvg(gamma=args.gamma, **options) if fusion == "weighted"
                else FedAvg(**options))
    weak = args.clients // 2 if mix == "mixed" else 0
    start = time.perf_counter()
    run = run_federated(model_factory(model, task, seed), task.shards,
                        budgets(args.clients, weak), strategy, num_rounds=args.rounds,
                        x_test=task.x_test, y_test=task.y_test, epochs=args.epochs,
                        num_cpus=args.cpus)
    params = sum(v.numel() for v in run.final_state.values())
    row = {"config": name, "dataset": dataset, "seed": seed, "model": model, "fusion": fusion,
           "weak_clients": weak, "clients": args.clients, "alpha": args.alpha, "parameters": params,
           "model_bytes": run.model_bytes, "accuracy": run.accuracy,
           "residual": run.residual, "bytes_sent": run.bytes_sent,
           "wall_s": time.perf_counter() - start}
    if fusion == "weighted":
        row["weights"] = [r.weights.tolist() for r in strategy.history]
        row["weak_weight_share"] = [_weak_share(r) for r in strategy.history]
    print(f"{dataset} seed {seed} {name}: final accuracy {run.accuracy[-1]:.3f}, "
          f"{row['wall_s']:.0f} s", flush=True)
    return row


def _weak_share(record: object) -> float:
    """Total fusion weight of the weak clients: those whose validation solves end with a mean
    residual above 1e-2 (ten times the strong clients' tolerance)."""
    return float(sum(w for w, r in zip(record.weights, record.reports, strict=True)
                     if r.residual > 1e-2))


def _example_share(row: dict) -> float:
    """The weak clients' share of the training examples (their FedAvg weight), rebuilt from
    the row's deterministic task."""
    task = make_task(row["dataset"], row["clients"], row.get("alpha", 0.5), row["seed"])
    counts = [len(s.x_train) for s in task.shards]
    return sum(counts[:row["weak_clients"]]) / sum(counts)


def to_reach(row: dict, target: float) -> tuple[int | None, int | None]:
    """First round whose test accuracy is >= target, and the bytes sent until then."""
    for r, acc in enumerate(row["accuracy"]):
        if acc >= target:
            return r, row["bytes_sent"][r]
    return None, None


def summarize(rows: list[dict], targets: dict[str, float], args: argparse.Namespace) -> str:
    """The Markdown table: per dataset and configuration, over the seeds."""
    lines = [
        "# Federated DEQs on Flower (benchmarks/federated.py)",
        "",
        f"{machine_header()}; Flower simulation engine (Ray, {args.cpus} CPUs, one per "
        f"client); {args.clients} clients, Dirichlet alpha = {args.alpha}, {args.rounds} "
        f"rounds of {args.epochs} local epoch(s); one run per seed and row (seeds under each "
        "heading); machine shared with other jobs. 'mixed': half the clients weak (4 solver "
        "steps, tol 0.1), the rest strong (60 steps, tol 1e-3). Rounds/MB to target: first "
        "round whose global test accuracy reaches the target (median over seeds; '-' = not "
        "reached by every seed, with how many did). MB: parameters sent, server to clients "
        "and back. Final "
        "accuracy: mean (min, max) over seeds. Weak clients' share of examples = their "
        "FedAvg weight; their fusion weight under the weighted rule is the mean over rounds "
        "and seeds.",
        "",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        target = targets[dataset]
        seeds = sorted({r["seed"] for r in rows if r["dataset"] == dataset})
        lines += [f"## {dataset} (target accuracy {target}; seeds {seeds})", "",
                  "| configuration | values in state_dict | KB per model | final accuracy | "
                  "rounds to target | MB to target | weak clients: share of examples | "
                  "weak clients: fusion weight |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in CONFIGS:
            group = [r for r in rows if r["dataset"] == dataset and r["config"] == name]
            if not group:
                continue
            reached = [to_reach(r, target) for r in group]
            final = [r["accuracy"][-1] for r in group]
            hits = sum(rounds is not None for rounds, _ in reached)
            if hits == len(reached):
                rounds = f"{np.median([x for x, _ in reached]):.1f}"
                mb = f"{np.median([b for _, b in reached]) / 1e6:.2f}"
            else:
                rounds, mb = f"- ({hits}/{len(reached)} seeds)", "-"
            weak = group[0]["weak_clients"] if group[0]["model"] == "deq" else 0  # no solver
            examples = "-" if not weak else f"{np.mean([_example_share(r) for r in group]):.2f}"
            share = ("-" if "weak_weight_share" not in group[0] or not weak
                     else f"{np.mean([np.mean(r['weak_weight_share']) for r in group]):.2f}")
            lines.append(
                f"| {name} | {group[0]['parameters']} | {group[0]['model_bytes'] / 1e3:.1f} | "
                f"{np.mean(final):.3f} (min {min(final):.3f}, max {max(final):.3f}) | "
                f"{rounds} | {mb} | {examples} | {share} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Test accuracy against MB sent (log scale, from round 1), one panel per dataset, one
    line per run."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    colours = dict(zip(CONFIGS, plt.rcParams["axes.prop_cycle"].by_key()["color"],
                       strict=False))
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for name in CONFIGS:
            for i, r in enumerate(x for x in rows
                                  if x["dataset"] == dataset and x["config"] == name):
                ax.plot(np.array(r["bytes_sent"][1:]) / 1e6, r["accuracy"][1:],
                        color=colours[name], marker=".", label=name if i == 0 else None,
                        alpha=0.8)
        ax.set_xscale("log")
        ax.set(title=dataset, xlabel="MB of parameters sent", ylabel="global test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"written {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "procedural"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true",
                        help="only re-render the table and figure from the JSON in --out")
    parser.add_argument("--append", action="store_true",
                        help="add the new runs to the rows already in --out's JSON")
    add_device_argument(parser)
    args = parser.parse_args()
    if args.device.type != "cpu":
        parser.error(f"--device {args.device}: not supported here; the clients train inside "
                     "Flower's simulation (contdeq.federated.run_federated), which has no "
                     "device option and runs on the CPU")
    torch.set_num_threads(1)
    if args.render:
        rows = json.loads((args.out / "federated.json").read_text())
        write_results("federated", summarize(rows, TARGETS, args), rows, args.out)
        plot(rows, args.out / "federated.png")
        return
    logging.getLogger("flwr").setLevel(logging.WARNING)
    rows: list[dict] = (json.loads((args.out / "federated.json").read_text()) if args.append
                        else [])
    for seed in args.seeds:
        for dataset in args.datasets:
            for name in args.configs:
                rows.append(run_config(name, dataset, seed, args))
                # written after every run, so an interrupted benchmark keeps what it measured
                write_results("federated", summarize(rows, TARGETS, args), rows, args.out)
                plot(rows, args.out / "federated.png")


if __name__ == "__main__":
    main()
