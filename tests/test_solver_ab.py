"""benchmarks/solver_ab.py: two versions of contdeq side by side in one process."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import contdeq
from benchmarks import solver_ab


def test_compare_reports_the_nfe_of_a_changed_copy(tmp_path: Path) -> None:
    """A copy of this tree whose Picard default damping is patched to 0.5, imported under
    another name, is a separate package: compare() reports its larger NFE for the Picard rows
    and the same NFE elsewhere, a row per case. Catches the tool
    timing this tree twice (the copy not really imported, or cases bound to the wrong
    package), which a comparison of the tree with an unchanged copy cannot show."""
    patched = tmp_path / "patched"
    shutil.copytree(Path(contdeq.__file__).parent, patched)
    picard = patched / "solvers" / "picard.py"
    source = picard.read_text()
    assert "damping: float = 1.0" in source
    picard.write_text(source.replace("damping: float = 1.0", "damping: float = 0.5"))
    try:
        base = solver_ab.import_copy(patched, "contdeq_copy", tmp_path)
        assert base is not contdeq and base.solvers.fixed_point is not contdeq.solvers.fixed_point
        rows = solver_ab.compare(base, batch=4, width=8, tol=1e-3, rounds=1, calls=1)
    finally:
        solver_ab.forget("contdeq_copy")
    assert "contdeq_copy" not in sys.modules
    assert [r["case"] for r in rows] == list(solver_ab.CASES)
    for r in rows:
        if "picard" in str(r["case"]):
            assert r["nfe_base"] > r["nfe_new"] > 1, r
        else:
            assert r["nfe_base"] == r["nfe_new"] > 1, r
        assert r["base_ms"] > 0 and r["new_ms"] > 0
    table = solver_ab.to_markdown(rows, "header")
    assert table.count("\n| ") == len(rows) + 1  # the column header and one line per case


@pytest.mark.skipif(shutil.which("git") is None or not (solver_ab.REPO / ".git").exists(),
                    reason="needs a git checkout (CI runs in one)")
def test_main_imports_a_git_revision() -> None:
    """The command line path: HEAD extracted with git archive, imported as contdeq_base,
    a row per case, and the module forgotten afterwards. Catches a broken extraction or a
    leaked module; whether the NFE columns tell two versions apart is the test above (here
    both sides may be the same code, so their numbers are not compared)."""
    rows = solver_ab.main(["--base", "HEAD", "--batch", "4", "--width", "8", "--rounds", "1",
                           "--calls", "1"])
    assert [r["case"] for r in rows] == list(solver_ab.CASES)
    assert all(r["nfe_base"] > 1 and r["nfe_new"] > 1 for r in rows)
    assert "contdeq_base" not in sys.modules
