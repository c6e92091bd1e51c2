"""The quality-weighted fusion rule: which client models are averaged, and with what weights.

Pure NumPy, no Flower: :class:`~contdeq.federated.QualityWeightedFedAvg` applies it to the
replies of a round. For client ``k`` with ``n_k`` training examples and validation accuracy
``a_k`` (of its model after local training, on its own validation split) the weight is

    w_k = n_k * a_k**gamma / sum_j n_j * a_j**gamma        (sum over the included clients j)

``gamma = 0`` is FedAvg (weights proportional to ``n_k``); larger ``gamma`` shifts weight to
the clients whose models are better. ``a_k`` is the client's own report by default; a client
that trains with a small solver budget measures its model under that budget, on its own
few validation samples, and can report as high an accuracy as a strong client. ``scores``
replaces it with what the server measures itself (e.g. each client model's accuracy on a
server-held validation set, under the server's solver: ``server_scores``), a signal the
clients cannot inflate. A client is *excluded* (weight 0, with a reason) when it
reports a diverged solve, a non-finite or out-of-range metric, no examples, or non-finite
parameters; it is never averaged in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..nn.checks import check_number

__all__ = ["ClientReport", "FusionWeights", "fuse_arrays", "fusion_weights", "server_scores"]

#: Metric keys a client reports with its update (the first is Flower's FedAvg weighting key).
NUM_EXAMPLES = "num-examples"
ACCURACY = "val-accuracy"
RESIDUAL = "val-residual"
CONVERGED = "val-converged"
NFE = "nfe"
DIVERGED = "diverged"


@dataclass(frozen=True)
class ClientReport:
    """What a client reports with its update after local training.

    Attributes:
        num_examples: local training examples ``n_k``.
        accuracy: validation accuracy ``a_k`` in ``[0, 1]`` of the locally trained model, with
            the client's own solver budget.
        residual: mean forward residual ``rms(f(z, x) - z)`` over the validation samples.
        converged: fraction of validation samples whose solve met its tolerance.
        nfe: mean forward evaluations of ``f`` per training batch.
        diverged: the local solve or loss became NaN/Inf (the update is not usable).
    """

    num_examples: int
    accuracy: float
    residual: float
    converged: float
    nfe: float
    diverged: bool = False

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float | int]) -> ClientReport:
        """Read a report from a client's metric record (keys as written by
        :meth:`to_metrics`); a missing key raises ``KeyError`` naming it."""
        missing = [k for k in (NUM_EXAMPLES, ACCURACY, RESIDUAL, CONVERGED, NFE, DIVERGED)
                   if k not in metrics]
        if missing:
            raise KeyError(f"client metrics lack {missing}; got keys {sorted(metrics)}")
        return cls(num_examples=int(metrics[NUM_EXAMPLES]), accuracy=float(metrics[ACCURACY]),
                   residual=float(metrics[RESIDUAL]), converged=float(metrics[CONVERGED]),
                   nfe=float(metrics[NFE]), diverged=bool(metrics[DIVERGED]))

    def to_metrics(self) -> dict[str, float | int]:
        """The report as a flat metric dict (Flower ``MetricRecord`` content)."""
        return {NUM_EXAMPLES: self.num_examples, ACCURACY: self.accuracy,
                RESIDUAL: self.residual, CONVERGED: self.converged, NFE: self.nfe,
                DIVERGED: int(self.diverged)}

    def problem(self) -> str | None:
        """Why this report must be excluded from fusion, or ``None`` when it is usable."""
        if self.diverged:
            return "its local solve or loss diverged (NaN/Inf)"
        if self.num_examples <= 0:
            return f"num_examples must be > 0, got {self.num_examples}"
        if not all(map(math.isfinite, (self.accuracy, self.residual, self.nfe))):
            return (f"non-finite metrics (accuracy={self.accuracy}, residual={self.residual}, "
                    f"nfe={self.nfe})")
        if not 0.0 <= self.accuracy <= 1.0:
            return f"accuracy must be in [0, 1], got {self.accuracy}"
        return None


@dataclass(frozen=True)
class FusionWeights:
    """The outcome of :func:`fusion_weights` for one round.

    Attributes:
        weights: ``(K,)`` float64, one per client in input order; 0 for excluded clients, the
            rest sum to 1.
        excluded: client index -> reason, for every client left out.
        fallback: the quality factors of all included clients were 0 (every accuracy 0), so
            the weights fell back to FedAvg's ``n_k / sum_j n_j``.
    """

    weights: np.ndarray
    excluded: dict[int, str] = field(default_factory=dict)
    fallback: bool = False


def fusion_weights(reports: Sequence[ClientReport], gamma: float = 1.0,
                   rejected: Mapping[int, str] | None = None,
                   scores: Sequence[float] | None = None) -> FusionWeights:
    """Weights of the quality-weighted fusion rule (module docstring) for one round.

    Args:
        reports: one :class:`ClientReport` per replying client (``K`` of them).
        gamma: exponent of the accuracy in the quality factor ``a_k**gamma``; ``>= 0``.
        rejected: client index -> reason, for clients the caller already found unusable
            (e.g. NaN/Inf parameters, an unreadable reply); they are excluded too.
        scores: ``(K,)`` quality in ``[0, 1]`` measured by the server, used instead of the
            reported accuracies (``None``: the reports'); a non-finite or out-of-range score
            excludes its client.

    Returns:
        :class:`FusionWeights` with ``weights`` ``(K,)``. All zero when every client is
        excluded (the caller keeps the previous global model).
    """
    gamma = float(check_number(gamma, "gamma", 0, finite=True))
    excluded = dict(rejected or {})
    if any(not 0 <= k < len(reports) for k in excluded):
        raise ValueError(f"rejected must map client indices in [0, {len(reports)}) to reasons, "
                         f"got {sorted(excluded)}")
    if scores is not None and len(scores) != len(reports):
        raise ValueError(f"scores must have one value per report ({len(reports)}), got "
                         f"{len(scores)}")
    for k, report in enumerate(reports):
        reason = report.problem()
        if reason is None and scores is not None and not 0.0 <= scores[k] <= 1.0:
            reason = f"server score must be in [0, 1], got {scores[k]}"
        if reason is not None and k not in excluded:
            excluded[k] = reason
    weights = np.zeros(len(reports))
    included = [k for k in range(len(reports)) if k not in excluded]
    if not included:
        return FusionWeights(weights, excluded)
    counts = np.array([reports[k].num_examples for k in included], dtype=np.float64)
    source = [r.accuracy for r in reports] if scores is None else list(scores)
    quality = np.array([source[k] for k in included], dtype=np.float64) ** gamma
    raw = counts * quality
    fallback = not raw.sum() > 0
    if fallback:
        raw = counts
    weights[included] = raw / raw.sum()
    return FusionWeights(weights, excluded, fallback)


def fuse_arrays(states: Sequence[Mapping[str, np.ndarray]],
                weights: np.ndarray) -> dict[str, np.ndarray]:
    """Weighted average ``sum_k w_k * state_k`` of the clients' parameters, key by key.

    Args:
        states: ``K`` dicts name -> array, all with the same names and shapes.
        weights: ``(K,)`` non-negative, summing to 1; clients with weight 0 are skipped (their
            arrays may hold NaN).

    Returns:
        name -> averaged array, in each name's original dtype (accumulated in float64;
        integer arrays rounded to the nearest integer).
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(states),):
        raise ValueError(f"weights must have shape ({len(states)},) (one per state), "
                         f"got {weights.shape}")
    if not (np.all(weights >= 0) and math.isclose(weights.sum(), 1.0, rel_tol=1e-9)):
        raise ValueError(f"weights must be >= 0 and sum to 1, got {weights.tolist()}")
    used = [k for k in range(len(states)) if weights[k] > 0]
    names = list(states[used[0]])
    shapes = {name: np.shape(states[used[0]][name]) for name in names}
    for k in used:
        if list(states[k]) != names:
            raise ValueError(f"state {k} has names {list(states[k])}, expected {names}")
        for name in names:  # NumPy would broadcast another shape silently
            if np.shape(states[k][name]) != shapes[name]:
                raise ValueError(f"state {k}'s {name!r} has shape {np.shape(states[k][name])}, "
                                 f"state {used[0]}'s {shapes[name]}: every state must have "
                                 f"the same shapes")
    fused = {}
    for name in names:
        total = sum(weights[k] * np.asarray(states[k][name], dtype=np.float64) for k in used)
        dtype = np.asarray(states[used[0]][name]).dtype
        if np.issubdtype(dtype, np.integer):  # to the nearest, not truncated: n*(1-ulp) -> n
            total = np.rint(total)
        fused[name] = np.asarray(total).astype(dtype)
    return fused


def server_scores(model_fn: Callable[[], Any], x_val: Any, y_val: Any
                  ) -> Callable[[Mapping[str, np.ndarray]], float]:
    """A scorer for :func:`fusion_weights`' ``scores``: loads a client's parameters into
    ``model_fn()`` (the server's model, with the server's solver settings; built at the first
    score, so that creating the scorer does not draw from torch's generator) and returns its
    accuracy on the server-held ``x_val`` ``(N, ...)`` / ``y_val`` ``(N,)``."""
    import torch

    from .local import evaluate_classifier

    models: list[Any] = []

    def score(state: Mapping[str, np.ndarray]) -> float:
        if not models:
            models.append(model_fn())
        models[0].load_state_dict({k: torch.as_tensor(np.asarray(v))
                                   for k, v in state.items()})
        return evaluate_classifier(models[0], x_val, y_val)[0]

    return score
