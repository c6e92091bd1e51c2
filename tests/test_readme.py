"""The README's Python snippets run as printed (a snippet using an undefined name, or an API
that changed, fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_python_snippets() -> None:
    """Catches a change of fence style that would make the test below check nothing."""
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches a README snippet that raises (e.g. ``NameError`` for an undefined ``x``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small problems: torch's thread pool only adds overhead here
    torch.manual_seed(0)
    try:
            exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), {})
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.strip()  # every snippet prints its result
