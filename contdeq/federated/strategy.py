"""The server side: Flower's FedAvg with the quality-weighted fusion rule."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import zip_longest

import numpy as np

from ..nn.checks import check_number
from ._flower import Array, ArrayRecord, FedAvg, Message, MetricRecord, aggregate_metricrecords
from .fusion import ClientReport, fuse_arrays, fusion_weights

__all__ = ["FusionRecord", "QualityWeightedFedAvg"]

logger = logging.getLogger(__name__)
#: Stands for a reply whose metrics could not be read (it is excluded with that reason).
_UNREADABLE = ClientReport(0, 0.0, 0.0, 0.0, 0.0, diverged=True)


@dataclass(frozen=True)
class FusionRecord:
    """How one round was fused.

    Attributes:
        server_round: the round (from 1).
        node_ids: Flower node id of each replying client, in reply order.
        reports: each client's :class:`ClientReport` (a diverged placeholder when its reply
            was unreadable).
        weights: ``(K,)`` fusion weight of each client (0 when excluded).
        excluded: node id -> why that client was left out of this round's fusion.
        failures: node id -> error of the clients whose reply was a failure (dropped out,
            crashed); they are not in ``node_ids``.
        scores: ``(K,)`` the server's scores of the clients' models (``score`` given), or
            ``None``.
    """

    server_round: int
    node_ids: list[int]
    reports: list[ClientReport]
    weights: np.ndarray
    excluded: dict[int, str]
    failures: dict[int, str]
    scores: list[float] | None = None


class QualityWeightedFedAvg(FedAvg):
    """FedAvg whose aggregation uses the quality-weighted fusion rule of
    :mod:`contdeq.federated.fusion`: ``w_k ∝ n_k * a_k**gamma`` over the usable clients.

    Clients whose reply is a failure (dropped out, raised) or whose report or parameters are
    unusable (diverged, NaN/Inf, out of range, names or shapes other than those most clients
    sent) are excluded from the round and logged as
    warnings; the round goes on with the others. When no client is usable the global model
    is kept. Every round's weights and exclusions are kept in :attr:`history`.

    Args:
        gamma: exponent of the accuracy in the quality factor (``0`` gives FedAvg's weights,
            still with the exclusions).
        score: ``score(state) -> [0, 1]`` measured by the server on each client's parameters
            (name -> array), used as the quality instead of the client's reported accuracy;
            e.g. :func:`~contdeq.federated.server_scores` (accuracy on a server-held
            validation set). ``None`` (default): the reports'.
        **fedavg_options: options of ``flwr.serverapp.strategy.FedAvg`` (``fraction_train``,
            ``min_train_nodes``, ``min_available_nodes``, ...).

    Attributes:
        history: one :class:`FusionRecord` per aggregated round.
    """

    def __init__(self, gamma: float = 1.0,
                 score: Callable[[Mapping[str, np.ndarray]], float] | None = None,
                 **fedavg_options: object) -> None:
        super().__init__(**fedavg_options)  # type: ignore[arg-type]
        self.gamma = float(check_number(gamma, "gamma", 0, finite=True))
        if score is not None and not callable(score):
            raise TypeError(f"score must be None or callable as score(state) -> float, got "
                            f"{type(score).__name__}")
        self.score = score
        self.history: list[FusionRecord] = []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fuse the replies of round ``server_round`` (Flower ``Strategy`` hook)."""
        replies = list(replies)
        failures = {m.metadata.src_node_id: str(m.error.reason) for m in replies
                    if m.has_error()}
        valid = [m for m in replies if not m.has_error()]
        node_ids = [m.metadata.src_node_id for m in valid]
        reports: list[ClientReport] = []
        states: list[dict[str, np.ndarray]] = []
        rejected: dict[int, str] = {}
        for k, msg in enumerate(valid):
            try:
                arrays = next(iter(msg.content.array_records.values()))
                reports.append(ClientReport.from_metrics(next(iter(
                    msg.content.metric_records.values()))))
                states.append({name: a.numpy() for name, a in arrays.items()})
            except (KeyError, StopIteration, ValueError, TypeError) as error:
                rejected[k] = f"unreadable reply: {error!r}"
                reports.append(_UNREADABLE)
                states.append({})
                continue
            if not all(np.isfinite(a).all() for a in states[k].values()
                       if np.issubdtype(a.dtype, np.number)):
                rejected[k] = "its parameters contain NaN/Inf"
        layouts = {k: [(name, np.shape(a)) for name, a in states[k].items()]
                   for k in range(len(states)) if k not in rejected}
        common = max(layouts.values(), key=list(layouts.values()).count, default=None)
        for k, layout in layouts.items():  # fuse_arrays needs one layout: the most common
            if layout != common:
                ours, theirs = next(pair for pair in zip_longest(layout, common or [])
                                    if pair[0] != pair[1])
                rejected[k] = ("its arrays' names or shapes differ from the other clients' "
                               f"(first: {ours} against {theirs})")
        scores = None
        if self.score is not None:
            scores = [math.nan if k in rejected else float(self.score(state))
                      for k, state in enumerate(states)]
        fusion = fusion_weights(reports, self.gamma, rejected, scores)
        record = FusionRecord(server_round, node_ids, reports, fusion.weights,
                              {node_ids[k]: why for k, why in sorted(fusion.excluded.items())},
                              failures, scores)
        self.history.append(record)
        for node, why in {**failures, **record.excluded}.items():
            logger.warning("round %d: client node %d excluded from fusion: %s", server_round,
                           node, why)
        if fusion.fallback:
            logger.warning("round %d: every usable client reported accuracy 0; fused with "
                           "FedAvg weights", server_round)
        if not fusion.weights.sum() > 0:
            logger.warning("round %d: no usable client; the global model is unchanged",
                           server_round)
            return None, None
        fused = fuse_arrays(states, fusion.weights)
        used = [msg.content for k, msg in enumerate(valid) if fusion.weights[k] > 0]
        metrics = aggregate_metricrecords(used, self.weighted_by_key)
        metrics["clients-fused"] = len(used)
        metrics["clients-excluded"] = len(fusion.excluded) + len(failures)
        return ArrayRecord({name: Array(np.ascontiguousarray(value))
                            for name, value in fused.items()}), metrics

