"""Federated rounds in one process, without Flower: the same clients and fusion rule as
:func:`~contdeq.federated.run_federated`, for experiments with many seeds.

Each round every client loads the global parameters into ``model_fn()``, applies its solver
budget (:func:`apply_budget`), trains on its shard (:func:`train_local`, seeded
``1000 * round + client`` as the Flower client does) and reports; the server fuses the
usable clients with :func:`fusion_weights` (``gamma = 0``: FedAvg's weights) and
:func:`fuse_arrays`, and evaluates the global model on its test set. Clients run one after
another; nothing is sent over a network, so ``bytes_sent`` counts the parameters' raw bytes
(both ways), not Flower's serialized records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..nn.checks import check_number
from .fusion import ClientReport, fuse_arrays, fusion_weights
from .local import LocalData, SolverBudget, apply_budget, evaluate_classifier, train_local

__all__ = ["FederatedRun", "run_in_process"]


@dataclass
class FederatedRun:
    """What :func:`run_federated` measured, one entry per round (round 0 = initial model).

    Attributes:
        accuracy: test accuracy of the global model after each round.
        residual: its mean forward residual on the test set (0 without equilibrium layers).
        converged: fraction of test samples whose forward solve met its tolerance.
        bytes_sent: cumulative bytes of model parameters sent, server to clients and back.
        model_bytes: bytes of one copy of the model's parameters (as serialized by Flower).
        final_state: the final global parameters as a torch ``state_dict``.
    """

    accuracy: list[float] = field(default_factory=list)
    residual: list[float] = field(default_factory=list)
    converged: list[float] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)
    model_bytes: int = 0
    final_state: dict[str, Tensor] = field(default_factory=dict)


def run_in_process(model_fn: Callable[[], nn.Module], shards: Sequence[LocalData],
                   budgets: Sequence[SolverBudget], *, num_rounds: int, x_test: Tensor,
                   y_test: Tensor, gamma: float = 0.0,
                   score: Callable[[Mapping[str, np.ndarray]], float] | None = None,
                   epochs: int = 1, lr: float = 1e-2, batch_size: int = 32,
                   history: list[dict] | None = None) -> FederatedRun:
    """Train ``model_fn()`` for ``num_rounds`` rounds over ``shards`` (module docstring).

    Args:
        model_fn: builds the model, ``(B, ...)`` -> ``(B, classes)`` logits; called once for
            the initial parameters (seed torch before) and once per client and round.
        shards, budgets: per client, its data and solver budget.
        num_rounds: federated rounds.
        x_test: ``(N, ...)`` server-side test inputs; ``y_test`` ``(N,)`` labels.
        gamma: exponent of the quality factor (0: FedAvg's weights, with the exclusions).
        score: the server's quality of a client's parameters (name -> array) in ``[0, 1]``
            (e.g. :func:`~contdeq.federated.server_scores`); ``None``: the clients' reports.
        epochs, lr, batch_size: local training per round.
        history: if given, one dict per round is appended: ``weights`` ``(K,)``, ``reports``
            (:class:`ClientReport`), ``scores`` and ``excluded``.

    Returns:
        :class:`FederatedRun` (test accuracy, residual, converged fraction and cumulative
        bytes per round, round 0 the initial model).
    """
    check_number(num_rounds, "num_rounds", 1, integer=True)
    if len(shards) == 0 or len(budgets) != len(shards):
        raise ValueError(f"shards and budgets must be non-empty with one budget per shard, got "
                         f"{len(shards)} shards and {len(budgets)} budgets")
    server = model_fn()
    state = {k: v.detach().clone() for k, v in server.state_dict().items()}
    run = FederatedRun()
    run.model_bytes = sum(v.numel() * v.element_size() for v in state.values())

    def evaluate() -> None:
        server.load_state_dict(state)
        accuracy, residual, converged = evaluate_classifier(server, x_test, y_test)
        run.accuracy.append(accuracy)
        run.residual.append(residual)
        run.converged.append(converged)
        run.bytes_sent.append(run.bytes_sent[-1] + 2 * len(shards) * run.model_bytes
                              if run.bytes_sent else 0)

    evaluate()
    for server_round in range(1, num_rounds + 1):
        reports: list[ClientReport] = []
        states: list[dict[str, np.ndarray]] = []
        rejected: dict[int, str] = {}
        for k, (shard, budget) in enumerate(zip(shards, budgets, strict=True)):
            model = model_fn()
            model.load_state_dict(state)
            apply_budget(model, budget)
            reports.append(train_local(model, shard, epochs=epochs, lr=lr,
                                       batch_size=batch_size, seed=1000 * server_round + k))
            states.append({n: v.detach().numpy().copy() for n, v in model.state_dict().items()})
            if not all(np.isfinite(a).all() for a in states[k].values()
                       if np.issubdtype(a.dtype, np.number)):
                rejected[k] = "its parameters contain NaN/Inf"
        scores = None
        if score is not None:
            scores = [float("nan") if k in rejected else float(score(s))
                      for k, s in enumerate(states)]
        fusion = fusion_weights(reports, gamma, rejected, scores)
        if history is not None:
            history.append({"weights": fusion.weights, "reports": reports, "scores": scores,
                            "excluded": fusion.excluded})
        if fusion.weights.sum() > 0:
            state = {n: torch.as_tensor(a) for n, a in fuse_arrays(states,
                                                                    fusion.weights).items()}
        evaluate()
    run.final_state = state
    return run
