"""The benchmarks' shared ``--device`` flag (``benchmarks/common.py``) and the CPU path of the
paper benchmark's ``--autocast`` rows. The CUDA path is exercised by
``benchmarks/gpu_check.sh`` on a machine with a GPU."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import torch

from benchmarks import common

BENCHMARKS = Path(common.__file__).parent


def test_parse_device_accepts_cpu_and_rejects_unknown_devices() -> None:
    """``--device cpu`` gives a CPU ``torch.device``; a non-device string or another device
    type is an argparse error naming the flag (not a crash deep inside a benchmark)."""
    assert common.parse_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "gpu0", "mps"):
        with pytest.raises(argparse.ArgumentTypeError, match="--device must be"):
            common.parse_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_parse_device_rejects_cuda_without_a_gpu() -> None:
    """``--device cuda`` on a machine without CUDA fails at parsing, saying so."""
    with pytest.raises(argparse.ArgumentTypeError, match="no CUDA device"):
        common.parse_device("cuda")


def test_device_argument_defaults_to_cpu() -> None:
    """The flag's default is the CPU (the published numbers), parsed to a ``torch.device``."""
    parser = argparse.ArgumentParser()
    common.add_device_argument(parser)
    assert parser.parse_args([]).device == torch.device("cpu")
    assert parser.parse_args(["--device", "cpu"]).device == torch.device("cpu")
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "tpu"])


def test_every_benchmark_script_takes_the_shared_device_flag() -> None:
    """Every script with a command line that runs the shared code builds its parser with
    ``common.make_parser`` (``--device`` from ``common.add_device_argument``; no private copies
    with other defaults; a report writer such as ``mutation_report.py`` runs no model).
    Catches a script added or edited without the flag."""
    parser = common.make_parser("A script.\n\nMore.")
    assert parser.parse_args([]).device == torch.device("cpu")
    assert parser.parse_args([]).out == common.RESULTS
    scripts = [p for p in BENCHMARKS.glob("*.py")
               if "parse_args(" in p.read_text() and "from .common import" in p.read_text()]
    assert len(scripts) >= 10
    missing = [p.name for p in scripts if "make_parser(__doc__" not in p.read_text()]
    assert missing == []
    private = [p.name for p in scripts
               if re.search(r"add_argument\(\s*\"--device\"", p.read_text())]
    assert private == []


def test_write_results_adds_no_cuda_line_on_cpu(tmp_path: Path) -> None:
    """Off CUDA the tables are unchanged (no peak-memory line)."""
    common.write_results("t", "| a |\n", [{"a": 1}], out=tmp_path)
    if not torch.cuda.is_initialized():
        assert "CUDA" not in (tmp_path / "t.md").read_text()


@pytest.mark.slow
def test_autocast_rows_train_on_cpu(tmp_path: Path) -> None:
    """``paper.py --autocast bfloat16 --device cpu`` trains each model in float32 and under
    autocast: one row each, a finite accuracy, no graph measured for the autocast row (the
    CPU path of ``results/mixed_precision.*`` end to end)."""
    pytest.importorskip("sklearn")
    from benchmarks import paper

    rows = paper.main(["--smoke", "--device", "cpu", "--tasks", "digits-mlp", "--models",
                       "DEQ(ode, ptc)", "--autocast", "bfloat16", "--name", "mp",
                       "--out", str(tmp_path)])
    assert [r["model"] for r in rows] == ["DEQ(ode, ptc)", "DEQ(ode, ptc) autocast bfloat16"]
    assert all(0 <= r["final_acc"] <= 100 and r["forward_nfe"] > 0 for r in rows)
    assert rows[0]["graph_mb"] > 0 and math.isnan(rows[1]["graph_mb"])
    written = json.loads((tmp_path / "mp.json").read_text())
    assert len(written) == 2
    assert "| DEQ(ode, ptc) autocast bfloat16 |" in (tmp_path / "mp.md").read_text()
