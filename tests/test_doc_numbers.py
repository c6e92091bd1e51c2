"""The numbers README.md and docs/solvers.md state about the solvers hold, and the README's
benchmark tables quote the committed results (``docs/check_numbers.py``)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "check_numbers.py"


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_documented_numbers_hold(one_thread: None) -> None:
    """Catches a documented figure the code contradicts (dopri8 documented with 12
    evaluations per step, torchdiffeq's first step as ~1e-6) or a README benchmark figure that
    the committed result tables do not contain."""
    spec = importlib.util.spec_from_file_location("check_numbers", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    claims = module.claims()
    assert len(claims) >= 10
    wrong = [(claim, value) for claim, value, holds in claims if not holds]
    assert not wrong
