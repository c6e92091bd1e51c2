"""Atomic checkpoints, and bit-for-bit resumption of a training run killed mid-epoch."""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn

from contdeq.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

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
    with pytest.raises(ValueError, match="not a contdeq checkpoint"):
        load_checkpoint(tmp_path / "other.pt", model)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got str"):
        load_checkpoint(path, "model")  # type: ignore[arg-type]


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
    position = torch.load(checkpoint, weights_only=True)
    assert position["epoch"] == 1 and 0 < position["batch"] < 15  # a mid-epoch checkpoint
    script = _script()
    resumed = script.train(script.parse_args([*ARGS, "--checkpoint", str(checkpoint),
                                              "--resume"]))
    straight = script.train(script.parse_args(ARGS))
    assert resumed.keys() == straight.keys()
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name
