"""Non-IID shards for federated experiments: a Dirichlet split of the labels."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ..nn.checks import check_number

__all__ = ["dirichlet_split"]


def dirichlet_split(labels: Tensor, num_clients: int, alpha: float,
                    seed: int = 0, min_size: int = 2) -> list[np.ndarray]:
    """Split sample indices among clients with Dirichlet(``alpha``) class proportions.

    For every class, its samples are shuffled and cut among the clients in proportions drawn
    from ``Dirichlet(alpha * ones(num_clients))`` (Hsu, Qi & Brown 2019): small ``alpha`` gives
    each client few classes (strongly non-IID), large ``alpha`` near-uniform shards. Proportions
    are redrawn (same generator) until every client holds at least ``min_size`` samples.

    Args:
        labels: ``(N,)`` integer class labels.
        num_clients: number of shards (>= 1).
        alpha: concentration (> 0).
        seed: seed of the generator.
        min_size: smallest shard accepted.

    Returns:
        ``num_clients`` sorted index arrays, disjoint, together covering ``range(N)``.
    """
    check_number(num_clients, "num_clients", 1, integer=True)
    check_number(alpha, "alpha", 0, strict=True, finite=True)
    check_number(min_size, "min_size", 0, integer=True)
    labels_np = np.asarray(labels)
    if labels_np.ndim != 1 or num_clients * min_size > len(labels_np):
        raise ValueError(f"labels must be (N,) with N >= num_clients * min_size "
                         f"({num_clients * min_size}), got shape {labels_np.shape}")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in np.unique(labels_np):
            members = rng.permutation(np.flatnonzero(labels_np == cls))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1]
                    * len(members)).astype(int)
            for shard, part in zip(shards, np.split(members, cuts), strict=True):
                shard.extend(part.tolist())
        if min(map(len, shards)) >= min_size:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shards]
    raise ValueError(f"no Dirichlet split with every shard >= min_size={min_size} in 1000 "
                     f"draws; raise alpha ({alpha}) or lower min_size")
