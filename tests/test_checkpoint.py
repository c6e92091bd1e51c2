"""Atomic checkpoints, and bit-for-bit resumption of a training run killed mid-epoch."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from contdeq.checkpoint import (
    Checkpoint,
    CheckpointError,
    _digest,
    load_checkpoint,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_digits.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def global_torch_state() -> Iterator[None]:
    """The training script turns on deterministic algorithms and one thread: undo after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _training_state() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_round_trip_restores_everything(tmp_path: Path) -> None:
    model, optimizer, scheduler = _training_state()
    path = save_checkpoint(tmp_path / "ck.pt", model, optimizer, scheduler, epoch=3, batch=7,
                           extra={"best": 0.5})
    expected = (torch.rand(4), random.random(), np.random.rand())  # noqa: NPY002
    fresh, fresh_opt, fresh_sched = _training_state()
    position = load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    assert position == Checkpoint(epoch=3, batch=7, extra={"best": 0.5})
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh_sched.state_dict() == scheduler.state_dict()
    moments = fresh_opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(moments, optimizer.state_dict()["state"][0]["exp_avg"])
    got = (torch.rand(4), random.random(), np.random.rand())  # noqa: NPY002
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_crash_while_saving_keeps_the_old_checkpoint(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, _ = _training_state()
    path = save_checkpoint(tmp_path / "ck.pt", model, optimizer, epoch=1)
    before = path.read_bytes()

    def crash(obj: object, handle: object) -> None:
        handle.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, optimizer, epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left over


def test_bad_arguments_name_the_argument(tmp_path: Path) -> None:
    model, optimizer, _ = _training_state()
    with pytest.raises(ValueError, match="epoch must be an int >= 0, got -1"):
        save_checkpoint(tmp_path / "ck.pt", model, epoch=-1)
    with pytest.raises(TypeError, match="optimizer must have state_dict"):
        save_checkpoint(tmp_path / "ck.pt", model, "adam", epoch=0)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=r"directory .* does not exist"):
        save_checkpoint(tmp_path / "missing" / "ck.pt", model, epoch=0)
    path = save_checkpoint(tmp_path / "ck.pt", model, epoch=0)
    with pytest.raises(ValueError, match="optimizer was given but the checkpoint"):
        load_checkpoint(path, model, optimizer)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a contdeq checkpoint"):
        load_checkpoint(tmp_path / "other.pt", model)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got str"):
        load_checkpoint(path, "model")  # type: ignore[arg-type]


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and Adam optimizer whose values differ from ``_training_state``'s."""
    torch.manual_seed(123)
    model, optimizer, _ = _training_state()
    return model, optimizer


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [t.clone() for t in model.state_dict().values()] + [
        t.clone() for s in optimizer.state_dict()["state"].values() for t in s.values()]


def test_flipped_bytes_inside_a_weight_are_detected(tmp_path: Path) -> None:
    """Catches a missing integrity check: 4 flipped bytes in a tensor's data loaded silently."""
    model, optimizer, _ = _training_state()
    path = save_checkpoint(tmp_path / "ck.pt", model, optimizer, epoch=1)
    data = bytearray(path.read_bytes())
    weight = model[0].weight.detach().numpy().tobytes()
    at = data.find(weight)  # torch stores a tensor's bytes as they are, uncompressed
    assert at > 0
    data[at + 8:at + 12] = bytes(b ^ 0xFF for b in data[at + 8:at + 12])
    path.write_bytes(bytes(data))
    fresh, fresh_opt = _fresh()
    before = _snapshot(fresh, fresh_opt)
    with pytest.raises(CheckpointError, match=r"ck\.pt' is corrupted: the SHA-256"):
        load_checkpoint(path, fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(fresh, fresh_opt),
                                                  strict=True))


@pytest.mark.parametrize(("content", "message"), [
    (lambda data: data[: len(data) // 2], "cannot be read: the file is truncated or corrupted"),
    (lambda data: b"", r"is empty \(0 bytes\)"),
    (lambda data: b"epoch = 3\nbatch = 4\n", "is not a checkpoint: it does not start with"),
    (lambda data: bytes(range(256)) * 4, "is not a checkpoint: it does not start with"),
])
def test_unreadable_files_name_the_file_and_the_problem(tmp_path: Path, content: Any,
                                                        message: str) -> None:
    """Catches torch's bare errors leaking out (``OSError: [Errno 22]``, an ``EOFError``
    without a message, ``KeyError: 101``) for truncated, empty, text and garbage files."""
    model, optimizer, _ = _training_state()
    data = save_checkpoint(tmp_path / "good.pt", model, optimizer, epoch=1).read_bytes()
    path = tmp_path / "bad.pt"
    path.write_bytes(content(data))
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path, *_fresh())
    assert str(path) in str(info.value)


def test_a_foreign_pickle_is_refused_without_advising_the_unsafe_loader(tmp_path: Path) -> None:
    """Catches torch's advice to retry with ``weights_only=False`` reaching the user."""
    path = tmp_path / "foreign.pt"
    torch.save({"version": 2, "obj": argparse.Namespace(a=1)}, path)
    with pytest.raises(CheckpointError, match="objects the safe loader refuses") as info:
        load_checkpoint(path, *_fresh())
    assert "weights_only" not in str(info.value) and info.value.__cause__ is None
    assert info.value.__suppress_context__


def _rewrite(path: Path, change: Any) -> None:
    """Apply ``change`` to the checkpoint's state and store it with a matching SHA-256 (a
    well-formed file whose content is wrong, not a corrupted one)."""
    payload = torch.load(path, weights_only=True)
    change(payload["state"])
    payload["sha256"] = _digest(payload["state"])
    torch.save(payload, path)


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), "invalid RNG state"),
    (lambda s: s.update(epoch=-5), "epoch must be an int >= 0, got -5"),
    (lambda s: s.update(epoch=True), "epoch must be an int >= 0, got True"),
    (lambda s: s.update(batch="x"), "batch must be an int >= 0, got 'x'"),
    (lambda s: s["model"].pop("2.bias"), r"missing keys \['2.bias'\]"),
    (lambda s: s["model"].update({"0.weight": torch.zeros(2, 2)}), r"0.weight has shape \(2, 2\)"),
])
def test_loading_changes_nothing_when_any_part_is_invalid(tmp_path: Path, change: Any,
                                                          message: str) -> None:
    """Catches a non-transactional load: the model overwritten before a bad RNG state (or a
    bad position) raises, or bad positions accepted."""
    model, optimizer, _ = _training_state()
    path = save_checkpoint(tmp_path / "ck.pt", model, optimizer, epoch=1)
    _rewrite(path, change)
    fresh, fresh_opt = _fresh()
    before, rng = _snapshot(fresh, fresh_opt), torch.get_rng_state()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(fresh, fresh_opt),
                                                  strict=True))
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_file_marked_version_true_is_refused(tmp_path: Path) -> None:
    """Catches ``version=True`` passing as version 1/2 (``True == 1`` in Python)."""
    model, _, _ = _training_state()
    path = save_checkpoint(tmp_path / "ck.pt", model, epoch=0)
    payload = torch.load(path, weights_only=True)
    payload["version"] = True
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="version True"):
        load_checkpoint(path, model)


def test_another_kind_of_optimizer_is_refused_before_loading(tmp_path: Path) -> None:
    """Catches an SGD state loaded into Adam (which failed only at the next step)."""
    model, _, _ = _training_state()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    sgd.step()
    path = save_checkpoint(tmp_path / "ck.pt", model, sgd, epoch=0)
    fresh, adam = _fresh()
    before = _snapshot(fresh, adam)
    with pytest.raises(CheckpointError, match="another kind of optimizer"):
        load_checkpoint(path, fresh, adam)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(fresh, adam), strict=True))


@pytest.mark.parametrize(("value", "hint"), [
    (np.float64(0.5), r"\.item\(\)"), (np.zeros(3), "torch.from_numpy"),
    (argparse.Namespace(lr=0.1), r"vars\(args\)"), (Path("/x"), r"str\(path\)"),
    (datetime.datetime(2026, 1, 1), "isoformat"),
])
def test_extras_the_safe_loader_refuses_are_refused_at_save(tmp_path: Path, value: object,
                                                            hint: str) -> None:
    """Catches extras that save but cannot be loaded back (found only at resume time)."""
    model, _, _ = _training_state()
    with pytest.raises(TypeError, match=rf"extra\['run'\]\['v'\] has type .*{hint}"):
        save_checkpoint(tmp_path / "ck.pt", model, epoch=0, extra={"run": {"v": value}})
    assert list(tmp_path.iterdir()) == []
    extra = {"run": {"lr": 0.1, "name": "a", "steps": [1, 2], "t": torch.ones(2), "n": None}}
    path = save_checkpoint(tmp_path / "ck.pt", model, epoch=0, extra=extra)
    loaded = load_checkpoint(path, model).extra["run"]
    assert loaded["steps"] == [1, 2] and torch.equal(loaded["t"], torch.ones(2))


def test_a_multistep_scheduler_round_trips(tmp_path: Path) -> None:
    """Catches ``MultiStepLR`` refused at save: its milestones are a ``collections.Counter``,
    which the safe loader reads back, but the content hash took only plain dicts."""
    model, optimizer, _ = _training_state()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2, 4], gamma=0.5)
    for _ in range(3):
        scheduler.step()
    path = save_checkpoint(tmp_path / "ck.pt", model, optimizer, scheduler, epoch=3)
    fresh, adam = _fresh()
    fresh_scheduler = torch.optim.lr_scheduler.MultiStepLR(adam, milestones=[9], gamma=0.1)
    load_checkpoint(path, fresh, adam, fresh_scheduler)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_sparse_buffers_and_conjugate_views_round_trip(tmp_path: Path) -> None:
    """Catches the content hash failing on tensors ``torch.save`` and the safe loader handle:
    a model's sparse buffer (a graph's adjacency) raised "unsupported memory format option
    Contiguous", a conjugate view in ``extra`` "view is not supported for conjugate view"."""
    model, _, _ = _training_state()
    adjacency = torch.sparse_coo_tensor(torch.tensor([[1, 0, 1], [0, 2, 0]]),
                                        torch.tensor([1.0, 2.0, 3.0]), (3, 3))
    model.register_buffer("adjacency", adjacency)
    z = torch.tensor([1 + 2j, 3 - 1j])
    extra = {"z": z.conj(), "blocks": torch.eye(4).to_sparse_csr()}
    path = save_checkpoint(tmp_path / "ck.pt", model, epoch=0, extra=extra)
    fresh, _ = _fresh()
    fresh.register_buffer("adjacency", torch.zeros(3, 3).to_sparse())
    loaded = load_checkpoint(path, fresh).extra
    assert torch.equal(loaded["z"], z.conj())
    assert torch.equal(loaded["blocks"].to_dense(), torch.eye(4))
    assert torch.equal(fresh.adjacency.to_dense(), adjacency.to_dense())
    changed = {"adjacency": torch.sparse_coo_tensor(adjacency._indices(),
                                                    torch.tensor([1.0, 2.0, 4.0]), (3, 3))}
    assert _digest(changed) != _digest({"adjacency": adjacency})


def test_temporaries_of_killed_saves_are_removed(tmp_path: Path) -> None:
    """Catches ``.tmp`` files of killed saves piling up (2.2 GB in the issue's probe), and
    checks that other files (another target's temporaries included) are left alone."""
    model, _, _ = _training_state()
    stale = [tmp_path / ".ck.pt.abc123_x.tmp", tmp_path / ".ck.pt.0123456789abcdef.tmp"]
    keep = [tmp_path / ".ck.pt.backup.pt.1234abcd.tmp", tmp_path / "ck.pt.tmp",
            tmp_path / "other.pt"]
    for file in stale + keep:
        file.write_bytes(b"partial")
    save_checkpoint(tmp_path / "ck.pt", model, epoch=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ck.pt"] + [p.name for p in keep])


def test_file_mode_follows_the_umask(tmp_path: Path) -> None:
    """Catches checkpoints written 0600 (``mkstemp``) where ``torch.save`` honours the umask."""
    model, _, _ = _training_state()
    old = os.umask(0o027)
    try:
        path = save_checkpoint(tmp_path / "ck.pt", model, epoch=0)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


def test_saving_through_a_symlink_replaces_its_target(tmp_path: Path) -> None:
    """Catches ``os.replace`` replacing the link itself instead of the file it points to."""
    model, _, _ = _training_state()
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "run.pt"
    target.write_bytes(b"old")
    link = tmp_path / "latest.pt"
    link.symlink_to(target)
    save_checkpoint(link, model, epoch=4)
    assert link.is_symlink() and link.resolve() == target
    assert load_checkpoint(target, model).epoch == 4


ARGS = ["--model", "skipdeq", "--epochs", "2", "--width", "8", "--batch-size", "100",
        "--seed", "3", "--quiet"]


def _kill_mid_epoch(checkpoint: Path) -> int:
    """Run the script in a subprocess and SIGKILL it during the second epoch."""
    cmd = [sys.executable, "-u", str(SCRIPT), *ARGS, "--checkpoint", str(checkpoint),
           "--checkpoint-every", "4", "--log-batches"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("epoch 1 batch 6/"):
                proc.send_signal(signal.SIGKILL)
                break
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        assert lines, "the training script printed nothing"


def test_killed_run_resumes_bit_for_bit(tmp_path: Path, global_torch_state: None) -> None:
    checkpoint = tmp_path / "run.pt"
    assert _kill_mid_epoch(checkpoint) == -signal.SIGKILL
    position = torch.load(checkpoint, weights_only=True)["state"]  # the safe loader reads it
    assert position["epoch"] == 1 and 0 < position["batch"] < 15  # a mid-epoch checkpoint
    script = _script()
    resumed = script.train(script.parse_args([*ARGS, "--checkpoint", str(checkpoint),
                                              "--resume"]))
    straight = script.train(script.parse_args(ARGS))
    assert resumed.keys() == straight.keys()
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name


def test_bytes_and_sets_round_trip(tmp_path: Path) -> None:
    """Catches ``bytes``, ``bytearray`` and ``set`` in ``extra`` refused with a message saying
    the safe loader cannot read them back (it can), and a set's digest depending on its
    iteration order (which differs between processes): equal sets hash equal, other ones not."""
    model, _, _ = _training_state()
    extra = {"token": b"\x00\x01abc", "buffer": bytearray(b"xyz"), "seen": {3, 1, 2},
             "names": {"b", "a"}}
    path = save_checkpoint(tmp_path / "ck.pt", model, epoch=0, extra=extra)
    fresh, _ = _fresh()
    assert load_checkpoint(path, fresh).extra == extra
    assert _digest({"s": {1, 2, 3}}) == _digest({"s": {3, 2, 1}})
    assert _digest({"s": {1, 2}}) != _digest({"s": {1, 2, 3}})
    assert _digest({"b": b"ab"}) != _digest({"b": bytearray(b"ab")})
    with pytest.raises(TypeError, match="frozenset"):
        save_checkpoint(tmp_path / "bad.pt", model, epoch=0, extra={"f": frozenset({1})})
