"""Summarise a mutmut run as Markdown: the score per module and every surviving mutant's diff.

``python -m benchmarks.mutation_report --help``; benchmarks/README.md describes it."""

from __future__ import annotations

import argparse
import fnmatch
import json
from collections import Counter
from pathlib import Path

#: mutmut's exit-code -> status table (mutmut/stats.py), restated so that the summary needs
#: mutmut only for the survivors' diffs.
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests",
          34: "skipped", 35: "suspicious", 36: "timeout", -24: "timeout", 24: "timeout",
          152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault", None: "not checked"}
#: Statuses that count as detected: a test failed, or the mutant hung (an endless loop).
DETECTED = ("killed", "timeout")


def load(patterns: list[str]) -> dict[str, dict[str, str]]:
    """``{module path: {mutant name: status}}`` for the mutants matching ``patterns``."""
    by_module: dict[str, dict[str, str]] = {}
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        chosen = {name: STATUS.get(code, "suspicious") for name, code in codes.items()
                  if not patterns or any(fnmatch.fnmatch(name, p) for p in patterns)}
        if chosen:
            by_module[str(meta.relative_to("mutants"))[: -len(".meta")]] = chosen
    return by_module


def score(statuses: Counter) -> tuple[int, int, float]:
    """``(detected, judged, percent)``: mutants not checked are left out."""
    judged = sum(n for status, n in statuses.items() if status != "not checked")
    detected = sum(statuses[s] for s in DETECTED)
    return detected, judged, 100.0 * detected / judged if judged else float("nan")


def diff_lines(name: str, path: str) -> str:
    """The changed lines of mutant ``name`` (``-`` original, ``+`` mutant)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name, path=path).splitlines()
    return "\n".join(line for line in diff if line[:1] in "+-" and line[:3] not in ("---", "+++"))


def report(by_module: dict[str, dict[str, str]], title: str) -> str:
    """The Markdown report."""
    total: Counter = Counter()
    rows = []
    for path, statuses in by_module.items():
        counts = Counter(statuses.values())
        total += counts
        detected, judged, percent = score(counts)
        rows.append(f"| {path} | {judged} | {detected} | {counts['survived']} | "
                    f"{counts['no tests']} | {counts['timeout']} | {percent:.1f} |")
    detected, judged, percent = score(total)
    lines = [f"# {title}", "",
             f"Mutation score: **{percent:.1f} %** ({detected} of {judged} mutants detected: "
             f"{total['killed']} killed by a test, {total['timeout']} timed out; "
             f"{total['survived']} survived, {total['no tests']} reached by no selected test"
             f"{', ' + str(total['not checked']) + ' not checked' if total['not checked'] else ''}"
             ").", "",
             "| module | mutants | detected | survived | no tests | timeout | score % |",
             "|---|---:|---:|---:|---:|---:|---:|", *rows, "", "## Surviving mutants", ""]
    for path, statuses in by_module.items():
        for name, status in statuses.items():
            if status in ("survived", "no tests"):
                lines += [f"`{name}` ({status})", "```diff", diff_lines(name, path), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", nargs="*", default=[], help="mutant name patterns")
    parser.add_argument("--title", default="Mutation testing (mutmut)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    text = report(load(args.patterns), args.title)
    if args.output is None:
        print(text)
    else:
        args.output.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
