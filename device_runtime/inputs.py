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
        return f"must be a string, not {json_kind(value)}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds a lone surrogate (U+{ord(value[exc.start]):04X} at character {exc.start}), not Unicode text"
    return None


def trained_on_pairs(holder: Any) -> bool | None:
    """``bundle.manifest.model.text_pairs`` of a runtime or a bundle: None when unknown (a bundle exported
    before the field, or a test's stand-in runtime), and then no input is refused for having or lacking a pair."""
    bundle = getattr(holder, "bundle", holder)
    value = getattr(getattr(getattr(bundle, "manifest", None), "model", None), "text_pairs", None)
    return value if isinstance(value, bool) else None


def pair_problem(text_pairs: bool | None, has_pair: bool, pair_name: str = "text_pair") -> str | None:
    """Why an input does not fit a model trained on pairs (``text_pairs`` True) or on single texts (False).

    A pair model fed a lone text (or the reverse) still answers, but what it answers is meaningless: the
    second segment it learned to compare against is missing. ``pair_name``: how the caller's input names it.
    """
    if text_pairs is True and not has_pair:
        return f"this model was trained on text pairs: give {pair_name} too"
    if text_pairs is False and has_pair:
        return f"this model was trained on single texts: drop {pair_name}"
    return None


def json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    kinds = {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


__all__ = ["InputError", "json_kind", "pair_problem", "parse_json", "text_problem", "trained_on_pairs"]
