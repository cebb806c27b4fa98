"""Pieces shared by the benchmarks' reports: a bound that was checked, and the table of them."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path


def bench_command(name: str, argv: list[str] | None) -> str:
    """The command line a result records: ``cartosplit bench NAME`` and the arguments it was given."""
    return shlex.join(["cartosplit", "bench", name, *(sys.argv[1:] if argv is None else argv)])


def check(name: str, value: object, bound: str, held: bool) -> dict:
    """One checked bound, as stored in a result JSON."""
    return {"check": name, "value": value, "bound": bound, "held": bool(held)}


def bounds_table(checks: list[dict], show: Callable[[object], object] = lambda v: v) -> list[str]:
    """Markdown lines of the "Bounds" section; ``show`` renders a value (e.g. a liveness dict) readably."""
    lines = ["## Bounds", "", "| check | value | bound | held |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['check']} | {show(c['value'])} | {c['bound']} | {'yes' if c['held'] else '**NO**'} |")
    return lines


def write_report(report: dict, out: str | Path, command: str, markdown: Callable[[dict], list[str]]) -> None:
    """``<out>.json`` (the report with its command and machine) and ``<out>.md`` rendered by ``markdown``."""
    from cartosplit.benchmarks.machine import describe_machine

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": command, "machine": describe_machine(), **report}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text("\n".join(markdown(report)) + "\n")
