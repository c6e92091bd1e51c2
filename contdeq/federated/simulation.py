"""Run a federated training on Flower's simulation engine (Ray), bounded and measured."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence

from torch import Tensor, nn

from ..nn.checks import check_number
from ._flower import (
    ArrayRecord,
    ConfigRecord,
    Context,
    FedAvg,
    Grid,
    Message,
    MetricRecord,
    ServerApp,
    simulate,
)
from .client import make_client_app
from .local import LocalData, SolverBudget, evaluate_classifier
from .rounds import FederatedRun

__all__ = ["FederatedRun", "run_federated"]

logger = logging.getLogger(__name__)


class _CountingGrid:
    """A Flower ``Grid`` that adds the bytes of every parameter record it carries (both
    ways) to ``run.bytes_sent``'s running total; everything else is the wrapped grid's."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.total = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.total += sum(record.count_bytes() for msg in messages + replies
                          if not msg.has_error()
                          for record in msg.content.array_records.values())
        return replies


def run_federated(model_fn: Callable[[], nn.Module], shards: Sequence[LocalData],
                  budgets: Sequence[SolverBudget], strategy: FedAvg, *, num_rounds: int,
                  x_test: Tensor, y_test: Tensor, epochs: int = 1, lr: float = 1e-2,
                  batch_size: int = 32, round_timeout: float = 600.0,
                  num_cpus: int = 2) -> FederatedRun:
    """Train ``model_fn()`` for ``num_rounds`` rounds on Flower's simulation engine, one
    simulated node per shard (:func:`make_client_app`), and evaluate the global model on the
    server after every round (logged at INFO level by ``contdeq.federated.simulation``).

    Args:
        model_fn: builds the model, ``(B, ...)`` -> ``(B, classes)`` logits; called once for
            the initial parameters (so seed torch before) and once per client and round.
        shards, budgets: per node, its data and solver budget.
        strategy: a Flower FedAvg-family strategy, e.g. :class:`QualityWeightedFedAvg`.
        num_rounds: federated rounds.
        x_test: ``(N, ...)`` server-side test inputs; ``y_test`` ``(N,)`` labels.
        epochs, lr, batch_size: local training per round.
        round_timeout: seconds the server waits for replies in a round; clients that have
            not answered by then are dropped from that round.
        num_cpus: CPUs given to Ray (each node uses one), hence concurrent clients.

    Returns:
        :class:`FederatedRun` (accuracy, residual, converged fraction, cumulative bytes per
        round).
    """
    check_number(num_rounds, "num_rounds", 1, integer=True)
    check_number(num_cpus, "num_cpus", 1, integer=True)
    check_number(round_timeout, "round_timeout", 0, strict=True, finite=True)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network
    run = FederatedRun()
    client_app = make_client_app(model_fn, shards, budgets, epochs=epochs, lr=lr,
                                 batch_size=batch_size)
    server_app = ServerApp()
    server_model = model_fn()
    initial = ArrayRecord(server_model.state_dict())
    run.model_bytes = initial.count_bytes()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        counting = _CountingGrid(grid)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            server_model.load_state_dict(arrays.to_torch_state_dict())
            accuracy, residual, converged = evaluate_classifier(server_model, x_test, y_test)
            run.accuracy.append(accuracy)
            run.residual.append(residual)
            run.converged.append(converged)
            run.bytes_sent.append(counting.total)
            logger.info("round %d: test accuracy %.3f, residual %.2e, %d bytes sent",
                        server_round, accuracy, residual, counting.total)
            return MetricRecord({"accuracy": accuracy, "residual": residual,
                                 "converged": converged})

        result = strategy.start(grid=counting, initial_arrays=initial, num_rounds=num_rounds,
                                timeout=round_timeout, train_config=ConfigRecord(),
                                evaluate_fn=evaluate)
        run.final_state = result.arrays.to_torch_state_dict()

    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "include_dashboard": False,
                      "logging_level": logging.ERROR, "log_to_driver": False},
    }
    simulate(server_app, client_app, len(shards), backend_config)
    if len(run.accuracy) != num_rounds + 1:
        raise RuntimeError(f"the simulation ended after {len(run.accuracy) - 1} of {num_rounds} "
                           "rounds; see Flower's log above")
    return run
