"""Federated training of contdeq models on Flower (issue #20).

Equilibrium models suit federated learning (Gkillas, Ampeliotis & Berberidis 2023): one
weight-tied layer is a small model to ship every round, and devices of very different compute
run the *same* model with different solver budgets. This package gives

* the client side: :class:`SolverBudget`, :func:`apply_budget`, :func:`train_local` and the
  Flower ``ClientApp`` of :func:`make_client_app`;
* the server side: :class:`QualityWeightedFedAvg`, Flower's FedAvg with the quality-weighted
  fusion rule of :func:`fusion_weights` (which excludes diverged/NaN clients);
* :func:`run_federated` on Flower's simulation engine, :func:`run_in_process` (the same
  clients and fusion in one process, no Flower: for many seeds), :func:`server_scores` (a
  quality signal the server measures itself) and :func:`dirichlet_split` for non-IID
  shards.

The pure parts (fusion rule, budgets, local training, splits) import without Flower; the
Flower parts need the ``federated`` extra (``pip install 'contdeq[federated]'``) and raise an
``ImportError`` saying so when it is missing. ``import contdeq`` never imports Flower.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from .fusion import ClientReport, FusionWeights, fuse_arrays, fusion_weights, server_scores
from .local import LocalData, SolverBudget, apply_budget, evaluate_classifier, train_local
from .partition import dirichlet_split
from .rounds import FederatedRun, run_in_process

#: Names that need Flower, by the submodule defining them (imported on first access).
_FLOWER_NAMES = {
    "make_client_app": "client",
    "FusionRecord": "strategy",
    "QualityWeightedFedAvg": "strategy",
    "run_federated": "simulation",
}


def _flower_installed() -> bool:
    """Whether Flower can be imported (without importing it: ``import contdeq`` never does)."""
    try:
        return importlib.util.find_spec("flwr") is not None
    except (ImportError, ValueError):  # a blocked or broken flwr entry in sys.modules
        return False


# Without Flower, ``from contdeq.federated import *`` takes the pure names only (the Flower ones
# would raise ImportError on access).
__all__ = [
    "ClientReport",
    "FederatedRun",
    "FusionWeights",
    "LocalData",
    "SolverBudget",
    "apply_budget",
    "dirichlet_split",
    "evaluate_classifier",
    "fuse_arrays",
    "fusion_weights",
    "run_in_process",
    "server_scores",
    "train_local",
]
if _flower_installed():
    __all__ += sorted(_FLOWER_NAMES)


def __getattr__(name: str) -> Any:
    """Import the Flower-based names lazily (``ImportError`` naming the extra without it)."""
    if name in _FLOWER_NAMES:
        return getattr(importlib.import_module(f".{_FLOWER_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
