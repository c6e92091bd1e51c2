"""Atomic training checkpoints: model, optimizer, scheduler, RNG states and position.

A checkpoint is written to a temporary file in the target's directory, flushed to disk and
then renamed over the target (``os.replace``, atomic on POSIX and Windows), so a crash while
saving leaves the previous checkpoint intact, never a truncated one. Loading restores the
random number generators (torch CPU and CUDA, Python's ``random``, NumPy's global one) so a
resumed run draws the same numbers as an uninterrupted one: with deterministic settings on
CPU (see ``docs/reliability.md``) it continues bit for bit.

Example::

    save_checkpoint("run.pt", model, optimizer, scheduler, epoch=epoch, batch=i + 1)
    ...
    position = load_checkpoint("run.pt", model, optimizer, scheduler)
    # continue at position.epoch, skipping the position.batch batches already done
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

__all__ = [
    "Checkpoint",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "unwrap_model",
]

#: Format version written into every checkpoint.
CHECKPOINT_VERSION = 1


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` / ``load_state_dict()`` (optimizers, LR schedulers)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class Checkpoint:
    """Where a loaded checkpoint left off.

    Attributes:
        epoch: the epoch in progress (0-based) when it was saved.
        batch: batches of that epoch already done (0 at an epoch boundary).
        extra: the ``extra`` mapping given to :func:`save_checkpoint`.
    """

    epoch: int
    batch: int
    extra: dict[str, Any] = field(default_factory=dict)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose ``state_dict`` is saved: without ``DistributedDataParallel`` /
    ``DataParallel`` (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers, so a
    checkpoint loads into a wrapped or an unwrapped model alike."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def rng_state() -> dict[str, Any]:
    """States of torch's CPU (and initialised CUDA) generators, ``random`` and NumPy's global
    generator, as plain tensors and numbers (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    legacy = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
              npy["cached_gaussian"])
    np.random.set_state(legacy)  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: Stateful | None = None,
    scheduler: Stateful | None = None,
    *,
    epoch: int,
    batch: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint of the training state to ``path``.

    Args:
        path: target file; its directory must exist. An existing file is replaced only once
            the new one is completely on disk.
        model: the model (wrappers such as DDP or ``torch.compile`` are removed first).
        optimizer: its state (moments, step counts) is saved when given.
        scheduler: learning-rate scheduler, saved when given.
        epoch: the epoch in progress (0-based), ``>= 0``.
        batch: batches of ``epoch`` already done, ``>= 0``.
        extra: more state to keep (tensors, numbers, strings, lists and dicts of them).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    In distributed training call it on one rank only (rank 0): every rank holds the same
    parameters. The RNG states saved are the calling process's.
    """
    path = _check_path(path)
    _check_objects(model, optimizer, scheduler)
    for name, value in (("epoch", epoch), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a mapping, got {type(extra).__name__}")
    payload = {
        "version": CHECKPOINT_VERSION,
        "epoch": epoch,
        "batch": batch,
        "model": unwrap_model(model).state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    _atomic_save(payload, path)
    return path


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: Stateful | None = None,
    scheduler: Stateful | None = None,
    *,
    restore_rng: bool = True,
    map_location: str | torch.device | None = "cpu",
    weights_only: bool = True,
) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` into the given objects.

    Args:
        path: the checkpoint file.
        model: receives the parameters and buffers (strict: names and shapes must match).
        optimizer: receives the optimizer state; the checkpoint must contain one.
        scheduler: receives the scheduler state; the checkpoint must contain one.
        restore_rng: restore the random number generators (default).
        map_location: passed to ``torch.load`` (default ``"cpu"``; the model and optimizer
            then move their tensors to where their own parameters live).
        weights_only: load with ``torch.load(weights_only=True)`` (default), which refuses
            arbitrary pickled objects.

    Returns:
        A :class:`Checkpoint` with the epoch and batch to continue from, and ``extra``.
    """
    path = _check_path(path)
    _check_objects(model, optimizer, scheduler)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint file at {str(path)!r}")
    payload = torch.load(path, map_location=map_location, weights_only=weights_only)
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        found = payload.get("version") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"path: {str(path)!r} is not a contdeq checkpoint of version "
                         f"{CHECKPOINT_VERSION} (found {found!r})")
    unwrap_model(model).load_state_dict(payload["model"])
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None:
            continue
        if payload[name] is None:
            raise ValueError(f"{name} was given but the checkpoint {str(path)!r} has no "
                             f"{name} state")
        obj.load_state_dict(payload[name])
    if restore_rng:
        set_rng_state(payload["rng"])
    return Checkpoint(epoch=payload["epoch"], batch=payload["batch"], extra=payload["extra"])


def _atomic_save(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _check_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: directory {str(path.parent)!r} does not exist")
    return path


def _check_objects(model: object, optimizer: object, scheduler: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None and not isinstance(obj, Stateful):
            raise TypeError(f"{name} must have state_dict() and load_state_dict() (a "
                            f"torch.optim optimizer / LR scheduler), got {type(obj).__name__}")

