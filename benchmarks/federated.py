"""Federated DEQs: weighted fusion (scored by the server, or from the clients' reports) vs
FedAvg with really weak clients, DEQ vs an explicit network of equal parameter count.

``python -m benchmarks.federated --help``; benchmarks/README.md describes it."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from contdeq.federated import run_federated, run_in_process, server_scores
from examples.federated_digits import budgets, make_strategy, make_task, model_factory

from .common import ci_text, machine_header, make_parser, write_results

#: name -> (model, strategy, clients weak out of --clients: "mixed" = half, "strong" = none)
CONFIGS = {
    "deq server-scored mixed": ("deq", "server", "mixed"),
    "deq reported mixed": ("deq", "reported", "mixed"),
    "deq fedavg mixed": ("deq", "fedavg", "mixed"),
    "deq fedavg strong": ("deq", "fedavg", "strong"),
    "mlp fedavg": ("mlp", "fedavg", "mixed"),
}
#: Target test accuracy per dataset (procedural: no model reaches 0.6 in 12 rounds here).
TARGETS = {"digits": 0.85, "procedural": 0.3}


def run_config(name: str, dataset: str, seed: int, args: argparse.Namespace) -> dict:
    """One federated run; the row of the JSON output."""
    model, fusion, mix = CONFIGS[name]
    task = make_task(dataset, args.clients, args.alpha, seed)
    weak = args.clients // 2 if mix == "mixed" else 0
    model_fn = model_factory(model, task, seed)
    start = time.perf_counter()
    history: list = []
    if args.engine == "flower":
        options = {"fraction_evaluate": 0.0, "min_train_nodes": args.clients,
                   "min_available_nodes": args.clients}
        strategy = make_strategy(fusion, args.gamma, model_fn, task, **options)
        run = run_federated(model_fn, task.shards, budgets(args.clients, weak), strategy,
                            num_rounds=args.rounds, x_test=task.x_test, y_test=task.y_test,
                            epochs=args.epochs, num_cpus=args.cpus)
        history = [{"weights": r.weights, "reports": r.reports}
                   for r in getattr(strategy, "history", [])]
    else:
        score = (server_scores(model_fn, task.x_server, task.y_server) if fusion == "server"
                 else None)
        run = run_in_process(model_fn, task.shards, budgets(args.clients, weak),
                             num_rounds=args.rounds, x_test=task.x_test, y_test=task.y_test,
                             gamma=0.0 if fusion == "fedavg" else args.gamma, score=score,
                             epochs=args.epochs, history=history)
    params = sum(p.numel() for p in model_fn().parameters())
    row = {"config": name, "dataset": dataset, "seed": seed, "model": model, "fusion": fusion,
           "weak_clients": weak, "clients": args.clients, "alpha": args.alpha,
           "engine": args.engine, "parameters": params, "model_bytes": run.model_bytes,
           "accuracy": run.accuracy, "residual": run.residual, "bytes_sent": run.bytes_sent,
           "wall_s": time.perf_counter() - start,
           "weights": [np.asarray(h["weights"]).tolist() for h in history],
           "weak_weight_share": [float(np.sum(np.asarray(h["weights"])[:weak]))
                                 for h in history]}
    print(f"{dataset} seed {seed} {name}: final accuracy {run.accuracy[-1]:.3f}, "
          f"{row['wall_s']:.0f} s", flush=True)
    return row


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
    engines = sorted({r.get("engine", "flower") for r in rows})
    lines = [
        "# Federated DEQs (benchmarks/federated.py)",
        "",
        f"{machine_header()}; engine {', '.join(engines)}; {args.clients} clients, Dirichlet "
        f"alpha = {args.alpha}, {args.rounds} rounds of {args.epochs} local epoch(s); one run "
        "per seed and row; machine shared with other jobs (the figures are accuracies and "
        "weights, not times). 'mixed': half the clients weak (2 solver steps, tol 0.1), the "
        "rest strong (60 steps, tol 1e-3). Final accuracy: the global model on the server's "
        "test set after the last round, mean ± 95% t-interval over seeds; differences paired "
        "by seed. Weak clients' share of examples = their FedAvg weight; their fusion weight "
        "is the mean over rounds and seeds.",
        "",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        target = targets[dataset]
        seeds = sorted({r["seed"] for r in rows if r["dataset"] == dataset})
        lines += [f"## {dataset} (seeds {seeds}; target accuracy {target})", "",
                  "| configuration | parameters | final accuracy | rounds to target (median) | "
                  "weak clients: share of examples | weak clients: fusion weight |",
                  "|---|---|---|---|---|---|"]
        final: dict[str, dict[int, float]] = {}
        for name in CONFIGS:
            group = [r for r in rows if r["dataset"] == dataset and r["config"] == name]
            if not group:
                continue
            final[name] = {r["seed"]: r["accuracy"][-1] for r in group}
            reached = [to_reach(r, target)[0] for r in group]
            hits = sum(x is not None for x in reached)
            rounds = (f"{np.median(reached):.1f}" if hits == len(reached)
                      else f"- ({hits}/{len(reached)} seeds)")
            weak = group[0]["weak_clients"] if group[0]["model"] == "deq" else 0
            examples = "-" if not weak else f"{np.mean([_example_share(r) for r in group]):.2f}"
            share = ("-" if not weak or not group[0].get("weak_weight_share") else
                     f"{np.mean([np.mean(r['weak_weight_share']) for r in group]):.2f}")
            lines.append(f"| {name} | {group[0]['parameters']} | "
                         f"{ci_text(list(final[name].values()), '.3f')} | {rounds} | {examples} | "
                         f"{share} |")
        lines += ["", "| paired difference in final accuracy | mean ± 95% CI |", "|---|---|"]
        for a, b in (("deq server-scored mixed", "deq fedavg mixed"),
                     ("deq reported mixed", "deq fedavg mixed"),
                     ("deq server-scored mixed", "deq reported mixed"),
                     ("deq fedavg strong", "deq fedavg mixed"),
                     ("deq fedavg mixed", "mlp fedavg"),
                     ("deq server-scored mixed", "mlp fedavg")):
            if a in final and b in final:
                common = sorted(set(final[a]) & set(final[b]))
                lines.append(f"| {a} − {b} | "
                             f"{ci_text([final[a][k] - final[b][k] for k in common], '.3f')} |")
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
    parser = make_parser(__doc__)
    parser.add_argument("--datasets", nargs="+", default=["digits"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--engine", choices=("inprocess", "flower"), default="inprocess")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--append", action="store_true",
                        help="add the new runs to the rows already in --out's JSON")
    args = parser.parse_args()
    if args.device.type != "cpu":
        parser.error(f"--device {args.device}: not supported here; the clients train inside "
                     "Flower's simulation (contdeq.federated.run_federated), which has no "
                     "device option and runs on the CPU")
    torch.set_num_threads(1)
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
