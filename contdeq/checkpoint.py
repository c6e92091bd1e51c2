"""Atomic training checkpoints: model, optimizer, scheduler, RNG states and position.

A checkpoint is written to a temporary file in the target's directory, flushed to disk and
then renamed over the target (``os.replace``, atomic on POSIX and Windows), so a crash while
saving leaves the previous checkpoint intact, never a truncated one. Loading restores the
random number generators (torch CPU and CUDA, Python's ``random``, NumPy's global one) so a
resumed run draws the same numbers as an uninterrupted one: with deterministic settings on
CPU (see ``docs/reliability.md``) it continues bit for bit.

A checkpoint stores the SHA-256 of its content beside it, and loading verifies it, then checks
the whole file against the objects it is loaded into, before changing any of them. The file is
an ordinary ``torch.save`` archive of plain containers and tensors: the safe loader
``torch.load(path, weights_only=True)`` reads it (the state is under ``"state"``).

Example::

    save_checkpoint("run.pt", model, optimizer, scheduler, epoch=epoch, batch=i + 1)
    ...
    position = load_checkpoint("run.pt", model, optimizer, scheduler)
    # continue at position.epoch, skipping the position.batch batches already done
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import random
import re
import secrets
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "unwrap_model",
]

#: Format tag and version written into every checkpoint (version 2 added the SHA-256).
CHECKPOINT_FORMAT = "contdeq-checkpoint"
CHECKPOINT_VERSION = 2
#: The entries of a checkpoint's ``state``.
_STATE_KEYS = {"epoch", "batch", "model", "optimizer", "scheduler", "rng", "extra"}
#: What ``torch.save`` writes first (a zip archive).
_ZIP_MAGIC = b"PK\x03\x04"
#: How to store common values the safe loader refuses, by module or type name.
_CONVERSIONS = {
    "numpy": "convert with .item() or torch.from_numpy()",
    "Namespace": "store vars(args)",
    "PosixPath": "store str(path)",
    "WindowsPath": "store str(path)",
    "datetime": "store value.isoformat()",
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: empty, truncated, corrupted (its SHA-256
    differs from the one saved in it), not a contdeq checkpoint, or not matching the model,
    optimizer or scheduler it is loaded into. The message names the file and the problem."""


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
    epoch: int = 0,
    batch: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint of the training state to ``path``.

    Args:
        path: target file; its directory must exist. An existing file is replaced only once
            the new one is completely on disk; a symbolic link is followed (its target is
            replaced, the link kept). The file's mode follows the umask, as ``torch.save``'s.
        model: the model (wrappers such as DDP or ``torch.compile`` are removed first).
        optimizer: its state (moments, step counts) is saved when given.
        scheduler: learning-rate scheduler, saved when given.
        epoch: the epoch in progress (0-based), ``>= 0``; default 0, for a quick save
            (``save_checkpoint("model.pt", model)``).
        batch: batches of ``epoch`` already done, ``>= 0``.
        extra: more state to keep: ``None``, bools, ints, floats, strings, bytes, tensors,
            and lists, tuples, sets and dicts of them (what the safe loader reads back).
            Anything else (NumPy values, ``argparse.Namespace``, ``Path``, ``datetime``,
            ``frozenset``, ...) raises ``TypeError`` here, naming the entry, rather than at
            resume time.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: an argument or an ``extra`` entry of an unsupported type.
        ValueError: ``epoch`` or ``batch`` not an int ``>= 0``.

    In distributed training call it on one rank only (rank 0): every rank holds the same
    parameters. The RNG states saved are the calling process's. Temporary files left by
    earlier saves to ``path`` that were killed midway are removed.
    """
    path = _check_path(path)
    target = Path(os.path.realpath(path))
    _check_objects(model, optimizer, scheduler)
    _check_position(epoch, batch, "")
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a mapping, got {type(extra).__name__}")
    state = {
        "epoch": epoch,
        "batch": batch,
        "model": unwrap_model(model).state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
               "sha256": _digest(state), "state": state}
    _remove_stale_temporaries(target)
    _atomic_save(payload, target)
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

    The file is read and checked completely first (its SHA-256, its structure, the model's
    parameter names and shapes, the optimizer's kind and parameter groups, the scheduler's and
    the RNG states); only then are the objects changed, so a refused checkpoint leaves them as
    they were.

    Args:
        path: the checkpoint file.
        model: receives the parameters and buffers (strict: names and shapes must match).
        optimizer: receives the optimizer state; the checkpoint must contain the state of the
            same kind of optimizer with the same parameter groups.
        scheduler: receives the scheduler state; the checkpoint must contain one.
        restore_rng: restore the random number generators (default).
        map_location: passed to ``torch.load`` (default ``"cpu"``; the model and optimizer
            then move their tensors to where their own parameters live).
        weights_only: load with ``torch.load(weights_only=True)`` (default), which refuses
            arbitrary pickled objects.

    Returns:
        A :class:`Checkpoint` with the epoch and batch to continue from, and ``extra``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is empty, truncated, corrupted (SHA-256 mismatch), not a
            contdeq checkpoint, or does not fit the given objects; the message names the file
            and the problem.
    """
    path = _check_path(path)
    _check_objects(model, optimizer, scheduler)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint file at {str(path)!r}")
    state = _read(path, map_location, weights_only)
    name = repr(str(path))
    model = unwrap_model(model)
    _check_model_state(model, state["model"], name)
    for kind, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None:
            continue
        if state[kind] is None:
            raise CheckpointError(f"{kind} was given but the checkpoint {name} has no "
                                  f"{kind} state")
        _check_same_kind(kind, obj.state_dict(), state[kind], name)
    if restore_rng:
        _check_rng_state(state["rng"], name)
    model.load_state_dict(state["model"])
    for kind, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None:
            obj.load_state_dict(state[kind])
    if restore_rng:
        set_rng_state(state["rng"])
    return Checkpoint(epoch=state["epoch"], batch=state["batch"], extra=state["extra"])


def _read(path: Path, map_location: str | torch.device | None,
          weights_only: bool) -> dict[str, Any]:
    """The checked ``state`` of the checkpoint at ``path`` (nothing is changed yet)."""
    name = repr(str(path))
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {name} is empty (0 bytes)")
    with path.open("rb") as handle:
        start = handle.read(len(_ZIP_MAGIC))
    if start != _ZIP_MAGIC:
        raise CheckpointError(f"{name} is not a checkpoint: it does not start with the zip "
                              f"archive torch.save writes (its first bytes are {start!r})")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: [^\n]*?(?=\.? We|\n|$)", str(exc))
        if refused:  # torch's message advises the unsafe loader: not repeated here
            raise CheckpointError(f"{name} holds objects the safe loader refuses "
                                  f"({refused.group(0)}): it was not written by "
                                  "save_checkpoint") from None
        raise CheckpointError(f"checkpoint {name} is corrupted: it cannot be unpickled") from None
    except Exception as exc:  # torch raises OSError, EOFError, RuntimeError, KeyError, ...
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"checkpoint {name} cannot be read: the file is truncated or "
                              f"corrupted ({type(exc).__name__}: {reason})") from None
    if not isinstance(payload, dict) or not {"format", "version"} & payload.keys():
        raise CheckpointError(f"{name} is not a contdeq checkpoint (it holds a "
                              f"{type(payload).__name__} without a format tag)")
    version = payload.get("version")
    if payload.get("format") != CHECKPOINT_FORMAT or type(version) is not int \
            or version != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {name} has format {payload.get('format')!r} version "
                              f"{version!r}; this contdeq reads {CHECKPOINT_FORMAT!r} version "
                              f"{CHECKPOINT_VERSION}")
    state, stored = payload.get("state"), payload.get("sha256")
    try:
        digest = _digest(state) if isinstance(state, dict) else None
    except TypeError:
        digest = None
    if digest is None or digest != stored:
        raise CheckpointError(f"checkpoint {name} is corrupted: the SHA-256 of its content "
                              "differs from the one stored when it was saved (the file changed "
                              "on disk or in transfer)")
    if set(state) != _STATE_KEYS:
        raise CheckpointError(f"checkpoint {name} has entries {sorted(state)}, expected "
                              f"{sorted(_STATE_KEYS)}")
    _check_position(state["epoch"], state["batch"], f"checkpoint {name}: ", CheckpointError)
    for key, kinds in (("model", dict), ("optimizer", (dict, type(None))),
                       ("scheduler", (dict, type(None))), ("rng", dict), ("extra", dict)):
        if not isinstance(state[key], kinds):
            raise CheckpointError(f"checkpoint {name}: its {key} entry is a "
                                  f"{type(state[key]).__name__}")
    return state


def _digest(obj: object, where: str = "") -> str:
    """SHA-256 (hex) of ``obj``'s content: types, keys, values and tensors' bytes; ``where``
    names ``obj`` in a refusal."""
    hasher = hashlib.sha256()
    _feed(hasher, obj, where)
    return hasher.hexdigest()


def _feed(hasher: Any, obj: object, where: str) -> None:
    """Hash ``obj`` into ``hasher``; ``TypeError`` naming ``where`` for what the safe loader
    (``torch.load(weights_only=True)``) would refuse."""
    kind = type(obj)
    hasher.update(kind.__name__.encode() + b"\0")
    if obj is None or kind in (bool, int, float, complex, str, torch.dtype, torch.device):
        hasher.update(repr(obj).encode() + b"\0")
    elif kind is Tensor or kind is nn.Parameter:
        tensor = obj.detach().cpu()  # type: ignore[union-attr]
        if tensor.layout != torch.strided:  # sparse: its layout, shape and component tensors
            _feed(hasher, (str(tensor.layout), tensor.shape, *_sparse_parts(tensor)), where)
            return
        tensor = tensor.resolve_conj().resolve_neg().contiguous()
        hasher.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif kind in (dict, OrderedDict, Counter):  # Counter: MultiStepLR's milestones
        hasher.update(f"{len(obj)}\0".encode())  # type: ignore[arg-type]
        for key, value in obj.items():  # type: ignore[attr-defined]
            _feed(hasher, key, where)
            _feed(hasher, value, f"{where}[{key!r}]" if where else str(key))
    elif kind in (list, tuple, torch.Size):
        hasher.update(f"{len(obj)}\0".encode())  # type: ignore[arg-type]
        for i, value in enumerate(obj):  # type: ignore[call-overload]
            _feed(hasher, value, f"{where}[{i}]")
    elif kind in (bytes, bytearray):
        hasher.update(f"{len(obj)}\0".encode() + bytes(obj))  # type: ignore[arg-type]
    elif kind is set:  # its iteration order differs between processes: the sorted digests
        digests = sorted(_digest(value, f"{where} element")
                         for value in obj)  # type: ignore[attr-defined]
        hasher.update(f"{len(digests)}\0".encode() + "".join(digests).encode())
    else:
        hint = _CONVERSIONS.get(kind.__module__.split(".")[0], _CONVERSIONS.get(kind.__name__,
                                                                                  ""))
        raise TypeError(f"{where} has type {kind.__module__}.{kind.__qualname__}, which "
                        "torch.load(weights_only=True) cannot read back; store None, bools, "
                        "ints, floats, strings, bytes, tensors, or lists, tuples, sets and "
                        "dicts of them"
                        + (f" ({hint})" if hint else ""))


def _sparse_parts(tensor: Tensor) -> tuple[Tensor, ...]:
    """The index and value tensors of a sparse ``tensor`` (COO, CSR, CSC, BSR or BSC)."""
    if tensor.layout == torch.sparse_coo:
        return tensor._indices(), tensor._values()
    if tensor.layout in (torch.sparse_csr, torch.sparse_bsr):
        return tensor.crow_indices(), tensor.col_indices(), tensor.values()
    return tensor.ccol_indices(), tensor.row_indices(), tensor.values()


def _check_position(epoch: object, batch: object, where: str,
                    error: type[ValueError] = ValueError) -> None:
    for name, value in (("epoch", epoch), ("batch", batch)):
        if type(value) is not int or value < 0:
            raise error(f"{where}{name} must be an int >= 0, got {value!r}")


def _check_model_state(model: nn.Module, saved: dict[str, Any], name: str) -> None:
    current = model.state_dict()
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {name} does not fit the model: missing keys "
                              f"{missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, value in current.items():
        other = saved[key]
        if isinstance(value, Tensor) and (not isinstance(other, Tensor)
                                          or other.shape != value.shape):
            shape = tuple(other.shape) if isinstance(other, Tensor) else type(other).__name__
            raise CheckpointError(f"checkpoint {name} does not fit the model: {key} has shape "
                                  f"{shape} in the checkpoint, {tuple(value.shape)} in the model")


def _check_same_kind(kind: str, current: dict[str, Any], saved: dict[str, Any],
                     name: str) -> None:
    """``saved`` is the state of the same kind of optimizer / scheduler as ``current``."""
    if set(saved) != set(current):
        raise CheckpointError(f"checkpoint {name}: its {kind} state has entries {sorted(saved)}, "
                              f"the given {kind}'s has {sorted(current)} (another kind of "
                              f"{kind})")
    if kind != "optimizer":
        return
    groups, saved_groups = current["param_groups"], saved["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    saved_sizes = [len(g["params"]) for g in saved_groups]
    if sizes != saved_sizes:
        raise CheckpointError(f"checkpoint {name}: its optimizer has parameter groups of "
                              f"sizes {saved_sizes}, the given optimizer {sizes}")
    for group, saved_group in zip(groups, saved_groups, strict=True):
        if set(group) != set(saved_group):
            raise CheckpointError(
                f"checkpoint {name} holds the state of another kind of optimizer: its "
                f"hyperparameters are {sorted(set(saved_group) - {'params'})}, the given "
                f"optimizer's {sorted(set(group) - {'params'})}")


def _check_rng_state(rng: dict[str, Any], name: str) -> None:
    """``rng`` has the shape of :func:`rng_state`'s result (so restoring it cannot fail)."""
    try:
        cpu = rng["torch"]
        _, internal, _ = rng["python"]
        keys = rng["numpy"]["keys"]
        valid = (isinstance(cpu, Tensor) and cpu.dtype == torch.uint8
                 and cpu.shape == torch.get_rng_state().shape
                 and len(internal) == len(random.getstate()[1])
                 and isinstance(keys, Tensor) and tuple(keys.shape) == (624,)
                 and rng["numpy"]["kind"] == "MT19937")
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise CheckpointError(f"checkpoint {name} holds an invalid RNG state (pass "
                              "restore_rng=False to load it without)")


def _remove_stale_temporaries(target: Path) -> None:
    """Delete the temporary files of earlier saves to ``target`` that were killed midway."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"[A-Za-z0-9_]+\.tmp")
    for entry in target.parent.iterdir():
        if pattern.fullmatch(entry.name):
            entry.unlink(missing_ok=True)


def _atomic_save(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over it.

    The temporary file is created with mode ``0o666`` less the umask (``mkstemp`` would make
    it ``0o600``)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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

