"""benchmarks/solver_ab.py: two versions of contdeq side by side in one process."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import contdeq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import solver_ab


def test_compare_against_a_copy_of_this_tree(tmp_path: Path) -> None:
    """A copy imported under another name is a separate package; both solve every case with
    the same NFE, and the table has a row per case."""
    try:
        base = solver_ab.import_copy(Path(contdeq.__file__).parent, "contdeq_copy", tmp_path)
        assert base is not contdeq and base.solvers.fixed_point is not contdeq.solvers.fixed_point
        rows = solver_ab.compare(base, batch=4, width=8, tol=1e-3, rounds=1, calls=1)
    finally:
        solver_ab.forget("contdeq_copy")
    assert "contdeq_copy" not in sys.modules
    assert [r["case"] for r in rows] == list(solver_ab.CASES)
    for r in rows:
        assert r["nfe_base"] == r["nfe_new"] > 1
        assert r["base_ms"] > 0 and r["new_ms"] > 0
    table = solver_ab.to_markdown(rows, "header")
    assert table.count("\n| ") == len(rows) + 1  # the column header and one line per case


@pytest.mark.skipif(shutil.which("git") is None or not (solver_ab.REPO / ".git").exists(),
                    reason="needs a git checkout (CI runs in one)")
def test_main_against_head() -> None:
    rows = solver_ab.main(["--base", "HEAD", "--batch", "4", "--width", "8", "--rounds", "1",
                           "--calls", "1"])
    assert len(rows) == len(solver_ab.CASES)
    assert all(r["nfe_base"] == r["nfe_new"] for r in rows)
    assert "contdeq_base" not in sys.modules
