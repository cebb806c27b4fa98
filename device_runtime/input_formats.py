"""What ``cartosplit run`` reads: text lines, JSON Lines, or a CSV/TSV table with a header row. No torch.

One :class:`InputRow` per input (a non-blank line, or a table row), numbered from 0 without gaps. A bad
line gets its error and the others go on: one unreadable line never costs the others their answers.
Only what would misread the *whole* input is refused up front (:class:`InputFormatError`, before any input
is answered): a table header naming no text column or an unknown column, and a text file whose first
line is such a header. Read as texts, a table's rows would all be answered wrongly: ``"good film\\t1"``
would be classified with its label inside the text.

Table column names mirror what training reads (``export/data.py``): its own files' ``text``,
``text_pair``, ``label``, and the GLUE TSVs' names (SST-2/CoLA ``sentence``; RTE ``sentence1``/
``sentence2``; MRPC ``#1 String``/``#2 String``/``Quality``), plus QNLI's ``question``/``sentence``, QQP's
``question1``/``question2`` and MNLI's ``premise``/``hypothesis`` as the GLUE downloads spell them.
"""

from __future__ import annotations

import csv
import difflib
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cartosplit.device_runtime.inputs import InputError, json_kind, pair_problem, parse_json, text_problem

INPUT_FORMATS = ("auto", "text", "jsonl", "csv", "tsv")
JSON_KEYS = ("text", "text_pair", "label", "id")
# what people write instead of a known key: named in the error, never guessed silently
_KEY_HINTS = {
    "pair": "text_pair",
    "textpair": "text_pair",
    "text2": "text_pair",
    "sentence": "text",
    "sentence1": "text",
    "question": "text",
    "sentence2": "text_pair",
    "labels": "label",
    "idx": "id",
    "index": "id",
}
# (text column, its pair column) in the order tried: QNLI's "sentence" is the pair of its "question",
# so a lone "sentence" (SST-2, CoLA) is tried last
_TEXT_COLUMNS: tuple[tuple[str, str | None], ...] = (
    ("text", "text_pair"),
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("#1 String", "#2 String"),
    ("premise", "hypothesis"),
    ("sentence", None),
)
_LABEL_COLUMNS = ("label", "Quality")  # Quality: MRPC's
_ID_COLUMNS = ("id", "idx", "index")
_DROPPED_COLUMNS = ("#1 ID", "#2 ID")  # MRPC's sentence ids: read and dropped
_TABLE_COLUMNS = frozenset(
    {c for pair in _TEXT_COLUMNS for c in pair if c} | {*_LABEL_COLUMNS, *_ID_COLUMNS, *_DROPPED_COLUMNS}
)
_INT = re.compile(r"[+-]?\d+")


class InputFormatError(ValueError):
    """The whole input cannot be read as asked; ``cartosplit run`` exits 2 before answering any of it."""


@dataclass(frozen=True)
class ReadOptions:
    """How to read an input. ``fmt``: one of :data:`INPUT_FORMATS` (auto: see :func:`resolve_format`)."""

    fmt: str = "auto"
    max_chars: int = 100_000
    labels: tuple[str, ...] = ()  # the model's label names: a given label is one of them, or its id
    text_pairs: bool | None = None  # the model was trained on pairs (None: unknown, nothing checked)
    given_labels: tuple[str, ...] | None = None  # --labels FILE: one per input, in order
    name: str = "input"  # for the errors that refuse the whole input


@dataclass
class InputRow:
    """One input: its text (and pair), or the error that keeps it from being answered."""

    index: int
    text: str | None = None
    pair: str | None = None
    error: str | None = None
    label: int | None = None  # the id of the label the input came with (None: unlabelled)
    id: str | int | None = None  # the input's own id, echoed in its answer


def resolve_format(fmt: str, path: str) -> str:
    """``auto`` reads ``.csv``/``.tsv`` files as tables; anything else stays ``auto``: per line, a line
    starting with ``{`` is JSON, any other a text. ``text`` takes every line as a text, ``jsonl`` every line
    as JSON."""
    if fmt not in INPUT_FORMATS:
        raise ValueError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}, got {fmt!r}")
    if fmt != "auto" or path == "-":
        return fmt
    return {".csv": "csv", ".tsv": "tsv"}.get(Path(path).suffix.lower(), "auto")


def read_inputs(source: Iterable[bytes], options: ReadOptions) -> Iterator[InputRow]:
    """The rows of ``source`` (lines of bytes). Header problems raise :class:`InputFormatError` here, at
    the call, before any row is produced; every other problem is its row's ``error``."""
    if options.fmt in ("csv", "tsv"):
        return _table_rows(source, options)
    return _line_rows(source, options)


def count_inputs(source: Iterable[bytes]) -> int:
    """How many inputs a line-format ``source`` holds (its non-blank lines, undecodable ones included)."""
    return sum(1 for _number, line, error in _decoded(source) if error is not None or line.strip())


def read_label_file(path: str) -> tuple[str, ...]:
    """``--labels FILE``: one label (a name or an id) per non-blank line, aligned with the inputs."""
    with open(path, encoding="utf-8-sig") as f:
        return tuple(line.strip() for line in f if line.strip())


def label_id(value: int | str, labels: Sequence[str]) -> int:
    """The id of a given label: one of ``labels`` by name, or an id 0..K-1 (also as a string: a CSV cell)."""
    if isinstance(value, str):
        name = value.strip()
        if name in labels:
            return list(labels).index(name)
        if not _INT.fullmatch(name):
            raise InputError(f"unknown label {value!r}; {_labels_hint(labels)}")
        value = int(name)
    if not 0 <= value < len(labels):
        raise InputError(f"label id {value} is out of range; {_labels_hint(labels)}")
    return value


def _labels_hint(labels: Sequence[str]) -> str:
    return f"this model's labels are {', '.join(labels)} (or their ids 0..{len(labels) - 1})"


# --- lines: text or JSON ----------------------------------------------------------------------------------


def _decoded(source: Iterable[bytes]) -> Iterator[tuple[int, str, str | None]]:
    """(line number, line without its end, error) per line; a BOM (as editors on Windows write) dropped."""
    for number, raw in enumerate(source, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, "", f"line {number}: not UTF-8 ({exc.reason} at byte {exc.start})"
            continue
        yield number, (line.removeprefix("\ufeff") if number == 1 else line).rstrip("\r\n"), None


def _line_rows(source: Iterable[bytes], options: ReadOptions) -> Iterator[InputRow]:
    lines = _decoded(source)
    head = []  # up to the first input: looked at for a header before anything is answered
    for number, line, error in lines:
        head.append((number, line, error))
        if error is None and line.strip():
            if options.fmt == "auto":
                _refuse_header_line(number, line, options.name)
            break
        if error is not None:
            break
    return _answer_lines(itertools.chain(head, lines), options)


def _refuse_header_line(number: int, line: str, name: str) -> None:
    """A first line of known column names ("sentence<TAB>label", "text,label") is a table's header."""
    delimiter = "\t" if "\t" in line else ","
    cells = [c.strip() for c in line.split(delimiter)]
    if len(cells) >= 2 and set(cells) <= _TABLE_COLUMNS and any(c for c, _ in _TEXT_COLUMNS if c in cells):
        fmt = "tsv" if delimiter == "\t" else "csv"
        raise InputFormatError(
            f"{name}: line {number} looks like a table's header row ({line.strip()!r}), not a text: read it as "
            f"a table with --input-format {fmt} (its label column then scores the answers), or, if the lines "
            "really are texts, say so with --input-format text"
        )


def _answer_lines(lines: Iterable[tuple[int, str, str | None]], options: ReadOptions) -> Iterator[InputRow]:
    index = 0
    for number, line, error in lines:
        if error is None and not line.strip():
            continue
        yield _line_row(index, number, line, error, options)
        index += 1


def _line_row(index: int, number: int, line: str, error: str | None, options: ReadOptions) -> InputRow:
    where = f"line {number}"
    if error is not None:
        return InputRow(index, error=error)
    if options.fmt == "jsonl" or (options.fmt == "auto" and line.lstrip().startswith("{")):
        return _json_row(index, where, line, options)
    row = InputRow(index, text=line)
    return _finish(row, where, _PAIR_AS_JSON, _given_label(index, options), options)


_PAIR_AS_JSON = '"text_pair" (a JSON line {"text": ..., "text_pair": ...})'  # a text line cannot hold one


def _json_row(index: int, where: str, line: str, options: ReadOptions) -> InputRow:
    try:
        record = parse_json(line, where)
    except InputError as exc:  # not JSON, nested too deeply, a number too long
        return InputRow(index, error=str(exc))
    if not isinstance(record, dict):
        return InputRow(index, error=f'{where}: a JSON line must be an object {{"text": ...}}, not {json_kind(record)}')
    text, pair, label, given_id = (record.get(k) for k in JSON_KEYS)
    problems = []
    if not isinstance(text, str):
        problems.append('a JSON line needs a "text" string')
    elif pair is not None and not isinstance(pair, str):
        problems.append('"text_pair" must be a string')
    unknown = [k for k in record if k not in JSON_KEYS]
    if unknown:
        problems.append(_unknown_keys(unknown))
    if problems:
        return InputRow(index, error=f"{where}: " + "; ".join(problems))
    for name, value in (("text", text), ("text_pair", pair)):
        problem = None if value is None else text_problem(value)
        if problem:
            return InputRow(index, error=f'{where}: "{name}" {problem}')
    if given_id is not None and (isinstance(given_id, bool) or not isinstance(given_id, (str, int))):
        return InputRow(index, error=f'{where}: "id" must be a string or an integer, not {json_kind(given_id)}')
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        return InputRow(index, error=f'{where}: "label" must be a label name or an integer id, not {json_kind(label)}')
    from_file = _given_label(index, options)
    if label is not None and from_file is not None:
        return InputRow(index, error=f'{where}: has a "label" and --labels gives one too; give it one way only')
    row = InputRow(index, text=text, pair=pair, id=given_id)
    return _finish(row, where, '"text_pair"', label if label is not None else from_file, options)


def _unknown_keys(unknown: list[str]) -> str:
    """'unknown key "pair" (did you mean "text_pair"?); a JSON line takes text, text_pair, label, id'."""
    named = []
    for key in unknown:
        low = key.lower()  # "Text", "Label": the same key, cased otherwise
        hint = low if low in JSON_KEYS else _KEY_HINTS.get(low)
        hint = hint or next(iter(difflib.get_close_matches(low, JSON_KEYS, n=1)), None)
        named.append(f'"{key}"' + (f' (did you mean "{hint}"?)' if hint else ""))
    plural = "s" if len(unknown) > 1 else ""
    return f"unknown key{plural} {', '.join(named)}; a JSON line takes {', '.join(JSON_KEYS)}"


def _given_label(index: int, options: ReadOptions) -> str | None:
    labels = options.given_labels
    return labels[index] if labels is not None and index < len(labels) else None


# --- tables: CSV, TSV -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Columns:
    """Where a table's fields are, by position, as its header names them."""

    width: int
    text: int
    text_name: str
    pair: int | None = None
    pair_name: str | None = None
    label: int | None = None
    id: int | None = None


def _table_rows(source: Iterable[bytes], options: ReadOptions) -> Iterator[InputRow]:
    tsv = options.fmt == "tsv"
    # surrogateescape: an undecodable byte becomes a lone surrogate that its row's check names, so one bad
    # row is that row's error; quoting off for TSV, as training reads GLUE's files (unbalanced '"' in texts)
    lines = (raw.decode("utf-8", "surrogateescape") for raw in source)
    first = next(lines, "").removeprefix("\ufeff")
    reader = csv.reader(
        itertools.chain([first], lines),
        delimiter="\t" if tsv else ",",
        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
    )
    header, number = _header(reader, options.name)
    where = f"{options.name}: line {number}"
    columns = table_columns(header, where, tsv)
    # every row would be refused: a table without the model's kind of input is the whole input's error
    problem = pair_problem(options.text_pairs, columns.pair is not None, "a pair column (text_pair, sentence2, ...)")
    if problem:
        raise InputFormatError(f"{where}: header {[c.strip() for c in header]}: {problem}")
    return _answer_table(reader, columns, options, tsv)


def _header(reader, name: str) -> tuple[list[str], int]:
    try:
        for row in reader:
            if any(c.strip() for c in row):
                return row, reader.line_num
    except csv.Error as exc:
        raise InputFormatError(f"{name}: line {reader.line_num}: cannot read the header row: {exc}") from None
    raise InputFormatError(f"{name} is empty; a CSV/TSV input needs a header row naming its columns ({_ACCEPTED})")


_ACCEPTED = (
    "the text in text, sentence, sentence1, question, question1, #1 String or premise; its pair in text_pair, "
    "sentence2, sentence (with question), question2, #2 String or hypothesis; label (or Quality) and "
    "id (or idx, index) optional"
)


def table_columns(header: Sequence[str], where: str, tsv: bool = False) -> _Columns:
    """The columns a header names, or :class:`InputFormatError` naming the accepted names."""
    names = [c.strip() for c in header]
    if any(_SURROGATE.search(c) for c in names):
        raise InputFormatError(f"{where}: the header row is not UTF-8")
    duplicated = sorted({c for c in names if names.count(c) > 1})
    if duplicated:
        raise InputFormatError(f"{where}: column(s) {duplicated} named twice in header {names}")
    text, pair = next(((t, p) for t, p in _TEXT_COLUMNS if t in names), (None, None))
    if text is None:
        hint = " (is it comma-separated? then use --input-format csv)" if tsv and "," in names[0] else ""
        hint = hint or (" (is it tab-separated? then use --input-format tsv)" if not tsv and "\t" in names[0] else "")
        raise InputFormatError(f"{where}: header {names} names no text column{hint}; accepted: {_ACCEPTED}")
    pair = pair if pair in names else None
    labels = [c for c in _LABEL_COLUMNS if c in names]
    ids = [c for c in _ID_COLUMNS if c in names]
    known = {text, pair, *labels, *ids, *_DROPPED_COLUMNS}
    unknown = [c for c in names if c not in known]
    if unknown or len(labels) > 1 or len(ids) > 1:
        why = f"unknown column(s) {unknown}" if unknown else f"more than one label or id column ({labels + ids})"
        raise InputFormatError(f"{where}: {why} in header {names}; accepted: {_ACCEPTED}")
    return _Columns(
        width=len(names),
        text=names.index(text),
        text_name=text,
        pair=None if pair is None else names.index(pair),
        pair_name=pair,
        label=names.index(labels[0]) if labels else None,
        id=names.index(ids[0]) if ids else None,
    )


_SURROGATE = re.compile("[\udc80-\udcff]")  # what surrogateescape made of an undecodable byte


def _answer_table(reader, columns: _Columns, options: ReadOptions, tsv: bool) -> Iterator[InputRow]:
    index, number = 0, reader.line_num + 1  # reader.line_num is a record's *last* line (quoted fields span lines)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # that record is lost; the reader goes on with the next line
            yield InputRow(index, error=f"line {number}: cannot parse as {'TSV' if tsv else 'CSV'}: {exc}")
            index, number = index + 1, reader.line_num + 1
            continue
        where, number = f"line {number}", reader.line_num + 1
        if not any(c.strip() for c in row):
            continue
        yield _table_row(index, where, row, columns, options, tsv)
        index += 1


def _table_row(index: int, where: str, row: list[str], columns: _Columns, options: ReadOptions, tsv: bool) -> InputRow:
    if len(row) != columns.width:
        why = "a tab inside a text?" if tsv else "quote a text that holds a comma"
        kind = "tab" if tsv else "comma"
        return InputRow(
            index, error=f"{where}: {len(row)} {kind}-separated fields, the header has {columns.width} ({why})"
        )
    bad = next((m for m in map(_SURROGATE.search, row) if m), None)
    if bad is not None:
        return InputRow(index, error=f"{where}: not UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x})")
    pair = None if columns.pair is None else row[columns.pair]
    label = None if columns.label is None else row[columns.label].strip() or None
    given_id = None if columns.id is None else row[columns.id].strip() or None
    # an empty pair cell is an absent pair, as training reads it (a CSV cell always exists)
    cells = InputRow(index, text=row[columns.text], pair=pair if pair and pair.strip() else None, id=given_id)
    return _finish(cells, where, f"a {columns.pair_name or 'text_pair'} column", label, options)


# --- checks common to all formats -------------------------------------------------------------------------


def _finish(row: InputRow, where: str, pair_name: str, label: int | str | None, options: ReadOptions) -> InputRow:
    """The text checks, the pair check against the model, and the label's id: the first problem is the error."""
    for name, value in (("text", row.text), ("text_pair", row.pair)):
        if value is None:
            continue
        if not value.strip():
            row.error = f"{where}: empty {name}"
        elif len(value) > options.max_chars:
            row.error = f"{where}: {len(value)} characters is over --max-chars {options.max_chars}"
        if row.error:
            return row
    problem = pair_problem(options.text_pairs, row.pair is not None, pair_name)
    if problem:
        row.error = f"{where}: {problem}"
        return row
    if label is not None:
        try:
            row.label = label_id(label, options.labels)
        except InputError as exc:
            row.error = f"{where}: {exc}"
    return row


__all__ = [
    "INPUT_FORMATS",
    "JSON_KEYS",
    "InputFormatError",
    "InputRow",
    "ReadOptions",
    "count_inputs",
    "label_id",
    "read_inputs",
    "read_label_file",
    "resolve_format",
    "table_columns",
]
