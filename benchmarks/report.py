"""Pieces shared by the benchmarks: their parser, the command a result records, a bound that was checked and
the table of them, the plot backend, and writing (and printing) the result files."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path


def bench_command(name: str, argv: list[str] | None) -> str:
    """The command line a result records: ``cartosplit bench NAME`` and the arguments it was given."""
    return shlex.join(["cartosplit", "bench", name, *(sys.argv[1:] if argv is None else argv)])


def bench_parser(name: str, description: str | None) -> argparse.ArgumentParser:
    """The parser of ``cartosplit bench NAME``: its usage line names the command as :func:`bench_command` does."""
    return argparse.ArgumentParser(
        prog=f"cartosplit bench {name}", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def check(name: str, value: object, bound: str, held: bool) -> dict:
    """One checked bound, as stored in a result JSON."""
    return {"check": name, "value": value, "bound": bound, "held": bool(held)}


def bounds_table(checks: list[dict], show: Callable[[object], object] = lambda v: v) -> list[str]:
    """Markdown lines of the "Bounds" section; ``show`` renders a value (e.g. a liveness dict) readably."""
    lines = ["## Bounds", "", "| check | value | bound | held |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['check']} | {show(c['value'])} | {c['bound']} | {'yes' if c['held'] else '**NO**'} |")
    return lines


def histogram_table(table: dict[str, dict[str, int]], label: str) -> list[str]:
    """Markdown lines of a count table: one row per key, one column per outcome seen anywhere (0 where absent)."""
    codes = sorted({c for row in table.values() for c in row})
    lines = [f"| {label} | " + " | ".join(codes) + " |", "|---" * (len(codes) + 1) + "|"]
    for key, row in table.items():
        lines.append(f"| {key} | " + " | ".join(str(row.get(c, 0)) for c in codes) + " |")
    return lines


def pyplot():
    """matplotlib's pyplot on the Agg backend: the benchmarks plot headless (over ssh, in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(report: dict, out: str | Path, command: str, markdown: Callable[[dict], list[str]]) -> dict:
    """``<out>.json`` (the report with its command and machine) and ``<out>.md`` rendered by ``markdown``;
    the report as written."""
    from cartosplit.benchmarks.machine import describe_machine

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": command, "machine": describe_machine(), **report}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text("\n".join(markdown(report)) + "\n")
    return report


def publish(
    report: dict,
    out: str | Path,
    command: str,
    markdown: Callable[[dict], list[str]],
    plot: Callable[[dict, Path], None] | None = None,
) -> dict:
    """:func:`write_report`, then the Markdown on stdout; with ``plot``, ``<out>.png`` too (its path recorded
    as ``report["plot"]``, which the Markdown links, and both files written again).

    The JSON and the Markdown are written before the plot, so a measurement is never lost to it; without
    matplotlib (a device install) the PNG is skipped with one line on stderr."""
    written = write_report(report, out, command, markdown)
    if plot is not None:
        png = Path(out).with_suffix(".png")
        try:
            plot(report, png)
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("matplotlib"):
                raise
            print(f"{png}: not drawn, matplotlib is not installed (the JSON and Markdown are written)", file=sys.stderr)
        else:
            report["plot"] = str(png)
            written = write_report(report, out, command, markdown)
    print("\n".join(markdown(written)))
    return written
