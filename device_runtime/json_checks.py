"""Reading parsed JSON into dataclasses with every problem named by its path, collected rather than raised.

A reader notes what is wrong (``model.hidden_size must be an integer, got str '32'``, ``files["x"] lacks
"size"``) in a ``Problems`` and goes on, so that one error can list everything; ``cartosplit.device_runtime.
manifest`` raises it. Torch-free.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar


def read_json_file(path: str | Path, what: str, plural: bool = False) -> Any:
    """The parsed JSON of a file a user points at; ValueError naming ``what`` when it is missing or not JSON."""
    path = Path(path)
    is_, does = ("are", "do") if plural else ("is", "does")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} {path} {does} not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} {is_} not valid JSON: {exc}") from None


Check = tuple[str, Callable[[Any], bool]]  # (what the value must be, test)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is no count


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


STR: Check = ("a string", lambda v: isinstance(v, str))
INT: Check = ("an integer", _is_int)
NUMBER: Check = ("a number", _is_number)
BOOL: Check = ("true or false", lambda v: isinstance(v, bool))
LIST: Check = ("a list", lambda v: isinstance(v, list))
STRS: Check = ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
INTS: Check = ("a list of integers", lambda v: isinstance(v, list) and all(_is_int(x) for x in v))
OBJECT: Check = ("an object", lambda v: isinstance(v, dict))
NUMBERS: Check = ("an object of numbers", lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values()))


def nullable(check: Check) -> Check:
    what, test = check
    return (f"{what} or null", lambda v: v is None or test(v))


# a Flat section's annotations (strings under ``from __future__ import annotations``) -> their check
_BY_TYPE = {
    "str": STR,
    "int": INT,
    "float": NUMBER,
    "bool": BOOL,
    "list[str]": STRS,
    "list[int]": INTS,
    "dict[str, float]": NUMBERS,
}


def at(path: str, key: str) -> str:
    """The path of a field: ``model.hidden_size``."""
    return f"{path}.{key}" if path else key


def item(path: str, key: str) -> str:
    """The path of an entry keyed by data (a file, graph, format): ``files["tokenizer.json"]``."""
    return f'{path}["{key}"]'


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


class Problems:
    """Everything wrong with a document, collected so that one error names it all."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, problem: str) -> None:
        self.found.append(problem)

    def check(self, value: Any, path: str, check: Check) -> bool:
        what, test = check
        if test(value):
            return True
        self.add(f"{path} must be {what}, got {_describe(value)}")
        return False

    def take(self, raw: dict, path: str, key: str, check: Check = OBJECT, required: bool = True) -> Any:
        """``raw[key]`` if present and of the right type, else None (and, unless optional and absent, a problem)."""
        if key not in raw:
            if required:
                self.add(f'{path} lacks "{key}"' if path else f'"{key}" is missing')
            return None
        value = raw[key]
        return value if self.check(value, at(path, key), check) else None

    def only(self, raw: dict, path: str, known) -> None:
        """Refuse unknown keys: a typo or a newer writer's field must not fall back to a default."""
        for key in raw:
            if key not in known:
                self.add(f'{path or "the manifest"} has an unknown field "{key}" (exported by a newer cartosplit?)')

    def exact(self, cls, raw: Any, path: str, check: Check) -> bool:
        """``raw`` holds exactly the dataclass ``cls``'s fields, each passing ``check``."""
        if not self.check(raw, path, OBJECT):
            return False
        before = len(self.found)
        for f in fields(cls):
            self.take(raw, path, f.name, check)
        self.only(raw, path, [f.name for f in fields(cls)])
        return len(self.found) == before


def plain(value: Any) -> Any:
    """A section or value as JSON data, in fresh objects."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if is_dataclass(value):  # e.g. SplitPoints: every field a JSON value
        return {f.name: copy.deepcopy(getattr(value, f.name)) for f in fields(value)}
    return copy.deepcopy(value)


class Flat:
    """A dataclass section of plain values: JSON keys are the field names, in field order, each checked against
    its annotation (``X | None``: null allowed) or ``CHECKS``; a field without a default is required."""

    CHECKS: ClassVar[dict[str, Check]] = {}  # field -> check, where the annotation is not in _BY_TYPE
    # fields older writers did not write: left out of to_dict while None, so that such a document round-trips
    # too and a reader can still tell "absent" (e.g. a server refusing a bundle without it)
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _check_of(cls, name: str, annotation: str) -> Check:
        if name in cls.CHECKS:
            return cls.CHECKS[name]
        if annotation.endswith(" | None"):
            return nullable(_BY_TYPE[annotation.removesuffix(" | None")])
        return _BY_TYPE[annotation]

    @classmethod
    def read(cls, raw: Any, path: str, problems: Problems):
        """Every key checked, unknown keys refused; None if anything failed (the problems are noted)."""
        if not problems.check(raw, path, OBJECT):
            return None
        before = len(problems.found)
        values = {}
        for f in fields(cls):
            value = problems.take(raw, path, f.name, cls._check_of(f.name, f.type), required=f.default is MISSING)
            if f.name in raw:
                values[f.name] = copy.deepcopy(value)
        problems.only(raw, path, [f.name for f in fields(cls)])
        return cls(**values) if len(problems.found) == before else None

    def to_dict(self) -> dict:
        return {
            f.name: plain(getattr(self, f.name))
            for f in fields(self)
            if not (f.name in self.OMIT_IF_NONE and getattr(self, f.name) is None)
        }


def entries(raw: Any, path: str, problems: Problems, read) -> dict | None:
    """An object of ``name -> entry``, each read with ``read(entry, its path, problems)``; None if any failed."""
    if raw is None or not problems.check(raw, path, OBJECT):
        return None
    found = {name: read(entry, item(path, name), problems) for name, entry in raw.items()}
    return None if any(e is None for e in found.values()) else found
