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
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType
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
    "simulate",
]


def simulate(server_app: ServerApp, client_app: ClientApp, num_supernodes: int,
             backend_config: dict) -> None:
    """Run ``server_app`` against ``num_supernodes`` simulated nodes of ``client_app`` on
    Flower's simulation runtime (Ray), in this process.

    Flower 1.42 deprecates the Python entry point ``flwr.simulation.run_simulation`` in favour
    of ``flwr run`` (a packaged app launched from the CLI, which cannot receive this process's
    data and model closures). Both end in the same runtime, ``_run_simulation`` (what
    ``flwr run``'s simulation process calls); this enters it directly, without the wrapper
    whose only other work is the deprecation notice and a telemetry event. It is a private
    function: the ``federated`` extra pins ``flwr==1.42.0``, and
    ``tests/test_federated.py`` runs a simulation through it.
    """
    _run_simulation(num_supernodes=num_supernodes,
                    exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    client_app=client_app, server_app=server_app, backend_config=backend_config)
