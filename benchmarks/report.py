"""Pieces shared by the benchmarks' reports: a bound that was checked, and the table of them."""

from __future__ import annotations

from collections.abc import Callable


def check(name: str, value: object, bound: str, held: bool) -> dict:
    """One checked bound, as stored in a result JSON."""
    return {"check": name, "value": value, "bound": bound, "held": bool(held)}


def bounds_table(checks: list[dict], show: Callable[[object], object] = lambda v: v) -> list[str]:
    """Markdown lines of the "Bounds" section; ``show`` renders a value (e.g. a liveness dict) readably."""
    lines = ["## Bounds", "", "| check | value | bound | held |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['check']} | {show(c['value'])} | {c['bound']} | {'yes' if c['held'] else '**NO**'} |")
    return lines
