"""argparse types shared by the ``cartosplit`` commands and the benchmarks' parsers.

Standard library only: every command module imports these, including those that run on a device.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def train_size(text: str) -> int | None:
    """A positive number of training samples, or ``all`` (None)."""
    return None if text == "all" else positive_int(text)


def positive_int_list(text: str) -> list[int]:
    """Comma-separated integers, each >= 1 (thread counts, lengths, batch sizes)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def comma_list(kind: Callable[[str], T]) -> Callable[[str], tuple[T, ...]]:
    """A comma-separated list of ``kind``, as a tuple (empty items are skipped)."""

    def parse(text: str) -> tuple[T, ...]:
        try:
            return tuple(kind(x) for x in text.split(",") if x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    return parse
