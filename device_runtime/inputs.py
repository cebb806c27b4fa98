"""Reading untrusted JSON and texts, shared by ``cartosplit run`` (per line) and ``serve-device`` (per body).

Every way a request body or an input line can be unreadable becomes one :class:`InputError` naming the
problem, never a crash further in: syntax errors, nesting deeper than the parser's recursion limit, integers
over Python's digit limit, and lone surrogates (``"\\ud800"`` is valid JSON but not Unicode text; the
tokenizer fails on it).
"""

from __future__ import annotations

import json
import sys
from typing import Any


class InputError(ValueError):
    """A body or a line that cannot be classified; ``str()`` says why, naming ``what`` it was."""


def parse_json(text: str, what: str) -> Any:
    """The JSON value of ``text``, or :class:`InputError` (``what``: "body", "line 3", ...)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise InputError(f"{what} is JSON nested too deeply to read") from None
    except ValueError:  # int() refuses numbers over sys.get_int_max_str_digits() digits
        limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 4300
        raise InputError(f"{what} holds a number of more than {limit} digits") from None


def text_problem(value: Any) -> str | None:
    """Why ``value`` is not a text the tokenizer can read (absent: it is one); empty strings are the caller's."""
    if not isinstance(value, str):
        return f"must be a string, not {_json_kind(value)}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds a lone surrogate (U+{ord(value[exc.start]):04X} at character {exc.start}), not Unicode text"
    return None


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    kinds = {int: "a number", float: "a number", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


__all__ = ["InputError", "parse_json", "text_problem"]
