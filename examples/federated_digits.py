"""Federated training of a continuous DEQ on Flower, with weak and strong clients.

One command (needs the ``federated`` extra, ``pip install -e '.[federated,examples]'``)::

    python examples/federated_digits.py --dataset digits --clients 6 --weak 3 --rounds 15

The data (scikit-learn's digits, or ``contdeq.data.procedural_images``) is split among the
clients by a Dirichlet(``--alpha``) draw of each class's proportions (non-IID shards); each
client keeps 20 % of its shard for validation. ``--weak`` of the clients are *weak* devices:
their forward solves get 2 steps and tolerances 0.1
(``SolverBudget(max_steps=2, atol=0.1, rtol=0.1)``); the others are *strong* (60 steps,
tolerances 1e-3). All train the same model,
``Linear -> DEQ(tanh(W z + x), ||W|| <= 0.9) -> Linear``, on Flower's simulation engine (Ray),
and the server fuses their models with the quality-weighted rule scored on a validation set
the server holds (``--strategy server``, default: half of the held-out data; the other half
is the test set), the rule on the clients' own reported accuracies (``--strategy reported``)
or plain FedAvg (``--strategy fedavg``); ``--model mlp`` swaps in an explicit two-hidden-layer
network with as many parameters as the DEQ model. The global model's test accuracy is printed
after every round.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from flwr.serverapp.strategy import FedAvg
from torch import Tensor, nn

import contdeq
from contdeq.federated import (
    LocalData,
    QualityWeightedFedAvg,
    SolverBudget,
    dirichlet_split,
    run_federated,
    server_scores,
)

#: Solver budgets of the two kinds of device.
WEAK = SolverBudget(max_steps=2, atol=1e-1, rtol=1e-1)
STRONG = SolverBudget(max_steps=60, atol=1e-3, rtol=1e-3)
DATASETS = ("digits", "procedural")
#: Fusion: quality weights scored by the server, or from the clients' reports; FedAvg.
STRATEGIES = ("server", "reported", "fedavg")
MODELS = ("deq", "mlp")


class Cell(nn.Module):
    """``f(z, x) = tanh(W z + x)`` with ``||W||_2 <= 0.9`` (fixed during each solve)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.W = contdeq.spectral_norm_cap(nn.Linear(width, width, bias=False), cap=0.9)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.W(z) + x)


def deq_classifier(features: int, classes: int, width: int = 48) -> nn.Module:
    """``(B, features)`` -> ``(B, classes)`` logits through one continuous DEQ layer."""
    return nn.Sequential(nn.Linear(features, width),
                         contdeq.DEQ(Cell(width), atol=STRONG.atol, rtol=STRONG.rtol,
                                     max_steps=STRONG.max_steps),
                         nn.Linear(width, classes))


def mlp_classifier(features: int, classes: int, width: int | None = None) -> nn.Module:
    """``(B, features)`` -> ``(B, classes)`` logits through an explicit network with two
    hidden layers; ``width`` default: the one whose parameter count is closest to
    :func:`deq_classifier`'s."""
    if width is None:
        target = sum(p.numel() for p in deq_classifier(features, classes).parameters())
        width = min(range(1, 512), key=lambda w: abs(
            (features + 1) * w + (w + 1) * w + (w + 1) * classes - target))
    return nn.Sequential(nn.Linear(features, width), nn.Tanh(), nn.Linear(width, width),
                         nn.Tanh(), nn.Linear(width, classes))


@dataclass(frozen=True)
class Task:
    """Clients' shards and the server's test set (``x_test`` ``(N, F)``, ``y_test`` ``(N,)``)."""

    shards: list[LocalData]
    x_test: Tensor
    y_test: Tensor
    features: int
    classes: int
    x_server: Tensor
    y_server: Tensor


def load_dataset(name: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(x, y)``: ``x`` ``(N, F)`` float32 in about ``[0, 1]``, ``y`` ``(N,)`` int64."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (torch.tensor(digits.data, dtype=torch.float32) / 16.0,
                torch.tensor(digits.target, dtype=torch.int64))
    x, y = contdeq.procedural_images(2400, size=12, seed=seed)
    return x.flatten(1), y


def make_task(dataset: str, clients: int, alpha: float, seed: int = 0,
              test_fraction: float = 0.2, val_fraction: float = 0.2) -> Task:
    """Shuffle ``dataset``, hold out ``test_fraction`` for the server (half its validation
    set ``x_server``, half the test set), split the rest among ``clients`` by
    :func:`~contdeq.federated.dirichlet_split` and keep ``val_fraction`` of each shard for the
    client's validation."""
    x, y = load_dataset(dataset, seed)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = int(test_fraction * len(x))
    x_test, y_test, x, y = x[:n_test], y[:n_test], x[n_test:], y[n_test:]
    shards = []
    for index in dirichlet_split(y, clients, alpha, seed=seed, min_size=10):
        index = torch.as_tensor(index)[torch.randperm(len(index),
                                                      generator=torch.Generator().manual_seed(seed))]
        n_val = max(2, int(val_fraction * len(index)))
        shards.append(LocalData(x[index[n_val:]], y[index[n_val:]],
                                x[index[:n_val]], y[index[:n_val]]))
    half = n_test // 2
    return Task(shards, x_test[half:], y_test[half:], x.shape[1], int(y.max()) + 1,
                x_test[:half], y_test[:half])


def model_factory(model: str, task: Task, seed: int) -> Callable[[], nn.Module]:
    """A ``model_fn`` for :func:`~contdeq.federated.run_federated`; the first call is seeded
    (the initial global model), later calls are overwritten by the received parameters."""
    build = deq_classifier if model == "deq" else mlp_classifier
    torch.manual_seed(seed)
    return lambda: build(task.features, task.classes)


def make_strategy(name: str, gamma: float, model_fn: Callable[[], nn.Module], task: Task,
                  **options: object) -> FedAvg:
    """The server's strategy: ``"server"`` (quality weights scored by the server on its
    validation set), ``"reported"`` (weights from the clients' reported accuracies) or
    ``"fedavg"``."""
    if name == "fedavg":
        return FedAvg(**options)
    score = server_scores(model_fn, task.x_server, task.y_server) if name == "server" else None
    return QualityWeightedFedAvg(gamma=gamma, score=score, **options)


def budgets(clients: int, weak: int) -> list[SolverBudget]:
    """The first ``weak`` clients get :data:`WEAK`, the others :data:`STRONG`."""
    return [WEAK if k < weak else STRONG for k in range(clients)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--model", choices=MODELS, default="deq")
    parser.add_argument("--strategy", choices=STRATEGIES, default="server")
    parser.add_argument("--gamma", type=float, default=1.0,
                        help="accuracy exponent of the weighted fusion rule")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--weak", type=int, default=3, help="how many clients are weak")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for Ray (parallel clients)")
    args = parser.parse_args(argv)
    if not 0 <= args.weak <= args.clients:
        parser.error(f"--weak must be in [0, --clients={args.clients}], got {args.weak}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    task = make_task(args.dataset, args.clients, args.alpha, args.seed)
    options = {"fraction_evaluate": 0.0, "min_train_nodes": args.clients,
               "min_available_nodes": args.clients}
    model_fn = model_factory(args.model, task, args.seed)
    strategy = make_strategy(args.strategy, args.gamma, model_fn, task, **options)
    run = run_federated(model_fn, task.shards,
                        budgets(args.clients, args.weak), strategy, num_rounds=args.rounds,
                        x_test=task.x_test, y_test=task.y_test, epochs=args.epochs,
                        num_cpus=args.cpus)
    print(f"{args.model} on {args.dataset}, {args.clients} clients ({args.weak} weak), "
          f"{args.strategy}; model {run.model_bytes} bytes")
    for r, (acc, sent) in enumerate(zip(run.accuracy, run.bytes_sent, strict=True)):
        print(f"round {r:2d}: test accuracy {acc:.3f}, {sent / 1e6:.2f} MB sent")
    for record in getattr(strategy, "history", []):
        weights = ", ".join(f"{w:.2f}" for w in record.weights)
        print(f"round {record.server_round:2d} fusion weights: {weights}; "
              f"excluded: {record.excluded or 'none'}")


if __name__ == "__main__":
    main()
