"""The Flower names :mod:`contdeq.federated` uses, imported in one place so that a missing
``flwr`` gives one clear message naming the extra to install."""

from __future__ import annotations

try:
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg, Result
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
    from flwr.simulation import run_simulation
except ModuleNotFoundError as error:  # pragma: no cover - CI installs the extra
    if not (error.name or "").startswith("flwr"):
        raise
    raise ImportError(
        "contdeq.federated needs Flower: install the 'federated' extra, "
        "pip install 'contdeq[federated]' (flwr[simulation]==1.42.0)"
    ) from error

__all__ = [
    "Array",
    "ArrayRecord",
    "ClientApp",
    "ConfigRecord",
    "Context",
    "FedAvg",
    "Grid",
    "Message",
    "MetricRecord",
    "RecordDict",
    "Result",
    "ServerApp",
    "aggregate_metricrecords",
    "run_simulation",
]
