"""Mixed precision: DEQ(ode, ptc) trained on digits-mlp in float32 and under ``torch.autocast``.

``python -m benchmarks.mixed_precision --help``; benchmarks/README.md describes it."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .common import (
    PRESETS,
    RESULTS,
    TOL,
    Cell,
    Config,
    load_task,
    machine_header,
    make_parser,
    table,
    threads,
    train_cells,
    write_results,
)

MODEL = "DEQ(ode, ptc)"
TASK = "digits-mlp"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def run(cfg: Config, dtype: torch.dtype, device: torch.device, out: Path = RESULTS
        ) -> list[dict[str, Any]]:
    """Train both precisions for every seed of ``cfg`` interleaved (``common.train_cells``);
    write and return the rows."""
    task = load_task(TASK, cfg.width[TASK], cfg.n_train, cfg.n_test, device)
    label = str(dtype).removeprefix("torch.")
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        cells = {name: Cell(task, MODEL, cfg, seed, autocast=cast)
                 for name, cast in (("float32", None), (f"autocast {label}", dtype))}
        for name, history in train_cells(task, cells, cfg.epochs, seed, []).items():
            rows.append({
                "precision": name, "seed": seed, "test_acc": history[-1]["test_acc"],
                "train_s": sum(r["train_s"] for r in history),
                "forward_nfe": sum(r["forward_nfe"] for r in history) / len(history),
                "backward_iterations": sum(r["backward_iterations"] for r in history)
                / len(history),
                "accuracy_curve": [r["test_acc"] for r in history],
            })
            print(f"seed {seed} {name:18s} acc {rows[-1]['test_acc']:5.1f}%", flush=True)
    write_results(cfg.name, to_markdown(rows, cfg, label, device), rows, out=out)
    return rows


def to_markdown(rows: list[dict[str, Any]], cfg: Config, label: str, device: torch.device
                ) -> str:
    """The table (one line per precision and seed, then the mean difference)."""
    lines = [table(
        "precision | seed | final test acc % | train s | fwd NFE / batch | bwd iters / batch",
        ((r["precision"], r["seed"], f"{r['test_acc']:.2f}", f"{r['train_s']:.1f}",
          f"{r['forward_nfe']:.1f}", f"{r['backward_iterations']:.1f}") for r in rows),
        head=[f"## Mixed precision: {MODEL} on {TASK} ({machine_header()}, device {device})", ""])]
    by = {}
    for r in rows:
        by.setdefault(r["precision"], []).append(r["test_acc"])
    (full, accs32), (half, accs16) = list(by.items())
    mean32, mean16 = sum(accs32) / len(accs32), sum(accs16) / len(accs16)
    lines += [
        f"Mean final test accuracy over seeds {list(cfg.seeds)}: {full} {mean32:.2f}%, {half} "
        f"{mean16:.2f}%; difference {mean16 - mean32:+.2f} points.",
        "",
        f"One run, {cfg.epochs} epochs, batch {cfg.batch}, width {cfg.width[TASK]}, Adam "
        f"{cfg.lr:g}, the paper benchmark's tolerances (forward {TOL['tol']:g}, backward "
        f"{TOL['backward_rtol']:g}); both precisions train interleaved epoch by epoch; autocast "
        f"({label}) covers the forward, the loss and evaluation (backward() and the optimizer "
        "step run outside it, contdeq's implicit backward under the forward's autocast "
        "state); parameters, optimizer and the "
        f"layer's solver state stay float32 (f computes in {label}). Training times come "
        "from a shared machine (noisy).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = make_parser(__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    cfg = replace(Config(), **PRESETS["smoke" if args.smoke else "full"])
    cfg.name = "mixed_precision_smoke" if args.smoke else "mixed_precision"
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.seeds is not None:
        cfg.seeds = tuple(args.seeds)
    with threads(args.threads):
        return run(cfg, DTYPES[args.dtype], args.device, args.out)


if __name__ == "__main__":
    warnings.filterwarnings("once")
    main()
