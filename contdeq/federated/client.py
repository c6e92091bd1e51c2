"""The Flower ``ClientApp``: each simulated or deployed node trains the shared model on its
shard with its own solver budget and replies with its parameters and its report."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..nn.checks import check_number
from ._flower import ArrayRecord, ClientApp, Context, Message, MetricRecord, RecordDict
from .fusion import ACCURACY, CONVERGED, NUM_EXAMPLES, RESIDUAL
from .local import LocalData, SolverBudget, apply_budget, evaluate_classifier, train_local

__all__ = ["make_client_app"]


def make_client_app(model_fn: Callable[[], nn.Module], shards: Sequence[LocalData],
                    budgets: Sequence[SolverBudget], *, epochs: int = 1, lr: float = 1e-2,
                    batch_size: int = 32) -> ClientApp:
    """A Flower ``ClientApp`` for node ``k`` = its ``partition-id`` (``node_config``).

    On a *train* message node ``k`` loads the received parameters into ``model_fn()``, applies
    ``budgets[k]`` (:func:`apply_budget`), trains on ``shards[k]`` (:func:`train_local`) and
    replies with its parameters (``"arrays"``) and its :class:`ClientReport` (``"metrics"``).
    On an *evaluate* message it replies with the received model's accuracy, mean residual and
    converged fraction on its validation split, under its budget.

    Args:
        model_fn: builds the model, mapping ``(B, ...)`` inputs to ``(B, classes)`` logits;
            every call must give the same architecture (parameter names and shapes).
        shards: one :class:`LocalData` per node.
        budgets: one :class:`SolverBudget` per node (same length as ``shards``).
        epochs, lr, batch_size: local training per round (:func:`train_local`).
    """
    if len(shards) == 0 or len(budgets) != len(shards):
        raise ValueError(f"shards and budgets must be non-empty with one budget per shard, got "
                         f"{len(shards)} shards and {len(budgets)} budgets")
    check_number(epochs, "epochs", 1, integer=True)
    app = ClientApp()

    def load(msg: Message, context: Context) -> tuple[nn.Module, int]:
        torch.set_num_threads(1)  # one core per simulated node
        node = int(context.node_config.get("partition-id", -1))
        if not 0 <= node < len(shards):
            raise ValueError(f"node_config partition-id must be in [0, {len(shards)}), got "
                             f"{node}")
        model = model_fn()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        return apply_budget(model, budgets[node]), node

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model, node = load(msg, context)
        server_round = int(msg.content["config"].get("server-round", 0))
        report = train_local(model, shards[node], epochs=epochs, lr=lr, batch_size=batch_size,
                             seed=1000 * server_round + node)
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord(report.to_metrics())})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        model, node = load(msg, context)
        data = shards[node]
        accuracy, residual, converged = evaluate_classifier(model, data.x_val, data.y_val)
        metrics = {NUM_EXAMPLES: len(data.x_val), ACCURACY: accuracy, RESIDUAL: residual,
                   CONVERGED: converged}
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app
