"""Per-call results of a layer (``stats``, auxiliary loss terms), kept per thread.

A layer shared by several threads (e.g. a model served by a thread pool, or trained with
Hogwild-style threads) runs several calls at once. Results stored as plain attributes would
hold whichever call finished last, in any thread; :class:`PerThreadResults` keeps them in a
``threading.local``, so ``layer.stats`` and ``contdeq.aux_loss(model)`` read the last call made
*in the calling thread*.
"""

from __future__ import annotations

import threading
from typing import Any

from torch import Tensor, nn

from ..implicit import DEQStats

__all__ = ["PerThreadResults"]


class PerThreadResults(nn.Module):
    """Base of the contdeq layers: :attr:`stats` and the aux terms of the calling thread's
    last call. Neither is pickled or deep-copied (a copy starts without results)."""

    def __init__(self) -> None:
        super().__init__()
        self._results = threading.local()

    @property
    def stats(self) -> DEQStats | None:
        """Statistics of the last call made in this thread (``None`` before one)."""
        return getattr(self._results, "stats", None)

    @stats.setter
    def stats(self, value: DEQStats | None) -> None:
        self._results.stats = value

    @property
    def _aux(self) -> dict[str, Tensor]:
        """Auxiliary loss terms of this thread's last training call, by name."""
        return getattr(self._results, "aux", {})

    @_aux.setter
    def _aux(self, value: dict[str, Tensor]) -> None:
        self._results.aux = value

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_results", None)  # a threading.local; its tensors hold graphs
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._results = threading.local()
