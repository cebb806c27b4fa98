"""Text classification data for cartosplit: the four GLUE tasks and a user's own CSV / JSON Lines files.

Why this module is numpy-only: it is imported by tools that must run on machines without torch (data
checks, bundle inspection), and loading text has no need for it. Tokenization happens elsewhere.

Why so many checks: training a split model takes hours and data cartography needs every sample's
training dynamics, so a silently mis-parsed file (a shifted column, a label read as text, a pair column
missing on a few rows) costs far more than a loud error at load time. Every bad-input problem raises
:class:`DataError` naming the file and line, and saying what to do about it.

GLUE is read from the TSV layout of the original GLUE download (the one BERT's ``run_classifier.py``
reads). When no such folder is found, :func:`load_glue` falls back to the Hugging Face ``datasets``
package, imported lazily so that it stays an optional dependency.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ENV_DATA_DIR",
    "TASKS",
    "DataError",
    "TaskSpec",
    "TextDataset",
    "load_file",
    "load_glue",
    "resolve_glue_dir",
    "task_spec",
]

ENV_DATA_DIR = "CARTOSPLIT_DATA_DIR"
"""Environment variable naming a folder in the GLUE TSV layout (``<dir>/SST-2/train.tsv`` ...)."""

# Where the shared GLUE copy lives next to a checkout: <parent of repo>/shared/data/glue. A module
# constant (not computed inside resolve_glue_dir) so tests can point it elsewhere.
_REPO_GLUE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
_CWD_GLUE_DIR = Path("..") / "shared" / "data" / "glue"


class DataError(ValueError):
    """Bad input data or a data location that cannot be used.

    A ValueError subclass so generic callers still catch it, but distinct so the CLI can print the
    message alone (it is written for the user) instead of a traceback.
    """


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """What the rest of the kit needs to know about a GLUE task.

    ``label_names[i]`` is the human name of GLUE label id ``i``, so predictions, reports and bundle
    metadata all use the same ids as GLUE's own files and leaderboards.
    """

    name: str
    glue_dir: str
    label_names: tuple[str, ...]
    is_pair: bool
    metric: str = "accuracy"  # GLUE's metric over the set (cartosplit.device_runtime.metrics)


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", "SST-2", ("negative", "positive"), is_pair=False),
    "cola": TaskSpec("cola", "CoLA", ("unacceptable", "acceptable"), is_pair=False, metric="mcc"),
    "mrpc": TaskSpec("mrpc", "MRPC", ("not_equivalent", "equivalent"), is_pair=True, metric="f1"),
    "rte": TaskSpec("rte", "RTE", ("entailment", "not_entailment"), is_pair=True),
}


@dataclass(frozen=True)
class _TsvLayout:
    """How one task's GLUE TSV is laid out.

    With a header, columns are found by name (robust to column order and extra columns in re-exported
    copies); CoLA has no header, so its columns are fixed positions. ``file_labels[i]`` is the string
    that encodes label id ``i`` in the file (RTE spells its labels out).
    """

    file_labels: tuple[str, ...]
    header: bool
    text: str | int
    label: str | int
    pair: str | int | None = None
    n_columns: int | None = None  # headerless files only: the exact column count


_TSV_LAYOUTS: dict[str, _TsvLayout] = {
    "sst2": _TsvLayout(("0", "1"), header=True, text="sentence", label="label"),
    # source, label, original label (mostly empty, '*' when the source marked it bad), sentence
    "cola": _TsvLayout(("0", "1"), header=False, text=3, label=1, n_columns=4),
    "mrpc": _TsvLayout(("0", "1"), header=True, text="#1 String", pair="#2 String", label="Quality"),
    "rte": _TsvLayout(("entailment", "not_entailment"), header=True, text="sentence1", pair="sentence2", label="label"),
}

_SPLITS = {"train": "train", "dev": "dev", "validation": "dev"}


def _normalise_task_name(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


def task_spec(name: str) -> TaskSpec:
    """Look a task up by any common spelling: ``sst2``, ``SST-2``, ``sst-2``, ``SST2``, ``CoLA``, ``rte`` ...

    Spellings differ between the GLUE folders (``SST-2``), Hugging Face (``sst2``) and papers, and users
    type whichever they saw last; matching ignores case, dashes, underscores and spaces.
    """
    if not isinstance(name, str):
        raise DataError(f"task name must be a string, got {type(name).__name__}")
    spec = TASKS.get(_normalise_task_name(name))
    if spec is None:
        known = ", ".join(f"{s.name} ({s.glue_dir})" for s in TASKS.values())
        raise DataError(f"unknown task {name!r}; known tasks: {known}. For other data use a CSV/JSONL file.")
    return spec


def _normalise_split(split: str) -> str:
    canonical = _SPLITS.get(split.strip().lower()) if isinstance(split, str) else None
    if canonical is None:
        raise DataError(
            f"unknown split {split!r}; use 'train' or 'dev' ('validation' also means dev). "
            "GLUE test labels are hidden, so there is no test split to train or evaluate on."
        )
    return canonical


# --------------------------------------------------------------------------------------------------
# Dataset container
# --------------------------------------------------------------------------------------------------


@dataclass
class TextDataset:
    """Texts (and optional second texts) with integer labels, in file order.

    Labels are a numpy int64 array rather than a list so cartography and metrics can index and compare
    them directly; texts stay Python strings because that is what tokenizers take. The invariants
    (equal lengths, labels in ``range(len(label_names))``) are checked on construction, so code that
    receives a TextDataset never has to re-check them.
    """

    texts: list[str]
    text_pairs: list[str] | None
    labels: np.ndarray
    label_names: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        self.texts = list(self.texts)
        if self.text_pairs is not None:
            self.text_pairs = list(self.text_pairs)
        self.label_names = tuple(self.label_names)
        labels = np.asarray(self.labels)
        if labels.size == 0:
            labels = labels.astype(np.int64)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{self.source}: labels must be a 1-D integer array, got dtype {labels.dtype} with shape {labels.shape}"
            )
        self.labels = labels.astype(np.int64, copy=False)
        n = len(self.texts)
        if len(self.labels) != n:
            raise DataError(f"{self.source}: {n} texts but {len(self.labels)} labels")
        if self.text_pairs is not None and len(self.text_pairs) != n:
            raise DataError(f"{self.source}: {n} texts but {len(self.text_pairs)} text pairs")
        if not self.label_names:
            raise DataError(f"{self.source}: label_names is empty")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.label_names)):
            raise DataError(
                f"{self.source}: labels must lie in 0..{len(self.label_names) - 1} "
                f"(label_names={self.label_names}), got {self.labels.min()}..{self.labels.max()}"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """Rows at ``indices``, in the order given (repeats allowed), as a new dataset.

        Used for cartography groups and train/holdout splits. Boolean masks and negative indices are
        refused rather than interpreted: a mask cast to ints or a wrapped-around index would silently
        select the wrong samples, and such an index here is almost always a bug upstream.
        """
        idx = np.asarray(indices)
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if idx.dtype == np.bool_:
            raise DataError("subset() takes integer indices, not a boolean mask; use np.flatnonzero(mask)")
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise DataError(f"subset() takes a 1-D array of integer indices, got dtype {idx.dtype} shape {idx.shape}")
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise DataError(f"subset() indices must lie in 0..{n - 1}, got {idx.min()}..{idx.max()}")
        order = idx.tolist()
        return TextDataset(
            texts=[self.texts[i] for i in order],
            text_pairs=None if self.text_pairs is None else [self.text_pairs[i] for i in order],
            labels=self.labels[idx].copy(),
            label_names=self.label_names,
            source=self.source,
        )


# --------------------------------------------------------------------------------------------------
# GLUE
# --------------------------------------------------------------------------------------------------


def resolve_glue_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Find the folder holding the GLUE TSVs (``<dir>/SST-2/train.tsv`` ...), or None.

    Order: the explicit ``data_dir``; ``$CARTOSPLIT_DATA_DIR``; ``../shared/data/glue`` from the current
    directory; ``shared/data/glue`` next to this checkout. A location the user named (argument or
    environment variable) that does not exist is an error, not a reason to fall through: silently
    training on some other copy, or downloading one, would hide the typo. The two conventional places
    are only guesses, so they are skipped when absent.
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise DataError(f"--data-dir {str(path)!r} {what}; pass a folder laid out like GLUE ({_layout_hint()})")
        return path
    env = os.environ.get(ENV_DATA_DIR, "").strip()
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(
                f"{ENV_DATA_DIR}={env!r} is not an existing directory; point it at a folder laid out like "
                f"GLUE ({_layout_hint()}) or unset it"
            )
        return path
    for candidate in (Path.cwd() / _CWD_GLUE_DIR, _REPO_GLUE_DIR):
        if candidate.is_dir():
            return candidate.resolve()  # no "repo/../shared" in messages and dataset sources
    return None


def _layout_hint() -> str:
    dirs = ", ".join(s.glue_dir for s in TASKS.values())
    return f"<TASK_DIR>/train.tsv and <TASK_DIR>/dev.tsv in the GLUE TSV layout, TASK_DIR one of {dirs}"


def load_glue(task: str, split: str = "train", data_dir: str | os.PathLike[str] | None = None) -> TextDataset:
    """Load a GLUE task's train or dev split.

    Local TSVs are preferred (reproducible, offline, what the benchmarks used); the Hugging Face
    ``datasets`` package is only a fallback when no folder resolves (see :func:`resolve_glue_dir`).
    Once a folder resolves, a missing file is an error rather than a reason to download: the user
    pointed somewhere specific, and mixing sources would make runs incomparable.
    """
    spec = task_spec(task)
    split = _normalise_split(split)
    root = resolve_glue_dir(data_dir)
    if root is None:
        return _load_glue_hf(spec, split)
    path = root / spec.glue_dir / f"{split}.tsv"
    if not path.is_file():
        raise DataError(_missing_tsv_message(root, spec, split, path))
    return _read_glue_tsv(path, spec)


def _missing_tsv_message(root: Path, spec: TaskSpec, split: str, path: Path) -> str:
    msg = f"GLUE file not found: {path} (expected {spec.glue_dir}/{split}.tsv under {root})"
    if (root / f"{split}.tsv").is_file():
        msg += f"; {root} itself holds {split}.tsv, so pass its parent folder as the data dir instead"
    else:
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if present:
            msg += f"; folders present there: {', '.join(present)}"
    return msg + f". Expected layout: {_layout_hint()}."


def _read_glue_tsv(path: Path, spec: TaskSpec) -> TextDataset:
    """Parse one GLUE TSV with quoting off: GLUE sentences contain unbalanced ``"`` characters, and the
    default csv dialect would swallow tabs and newlines until the next quote (merging rows)."""
    layout = _TSV_LAYOUTS[spec.name]
    label_ids = {s: i for i, s in enumerate(layout.file_labels)}
    texts: list[str] = []
    pairs: list[str] | None = [] if layout.pair is not None else None
    labels: list[int] = []
    # Column positions: fixed for a headerless layout, read off the header row otherwise.
    cols: dict[str, int] | None = None if layout.header else _fixed_columns(layout)
    n_columns = layout.n_columns
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            for row in reader:
                line = reader.line_num  # one record per line: quoting is off
                if not row:  # blank line (e.g. a stray one at the end of the file)
                    continue
                if cols is None:
                    cols = _glue_header(path, line, row, layout)
                    n_columns = len(row)
                    continue
                if len(row) != n_columns:
                    why = "truncated row?" if len(row) < (n_columns or 0) else "a tab inside a sentence?"
                    raise DataError(
                        f"{path}:{line}: row has {len(row)} tab-separated columns, expected {n_columns} "
                        f"({why}); {spec.glue_dir} files hold {_describe_layout(layout)}"
                    )
                raw_label = row[cols["label"]].strip()
                if raw_label not in label_ids:
                    raise DataError(
                        f"{path}:{line}: label {raw_label!r} is not one of {list(layout.file_labels)} "
                        f"for {spec.glue_dir}"
                    )
                text = row[cols["text"]]
                if not text.strip():
                    raise DataError(f"{path}:{line}: empty sentence")
                if pairs is not None:
                    pair = row[cols["pair"]]
                    if not pair.strip():
                        raise DataError(f"{path}:{line}: empty second sentence")
                    pairs.append(pair)
                texts.append(text)
                labels.append(label_ids[raw_label])
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: cannot parse as TSV: {exc}") from exc
    if not texts:
        what = "has a header but no data rows" if layout.header and cols else "is empty"
        raise DataError(f"{path} {what}; {spec.glue_dir} files hold {_describe_layout(layout)}")
    return TextDataset(texts, pairs, np.asarray(labels, dtype=np.int64), spec.label_names, str(path))


def _fixed_columns(layout: _TsvLayout) -> dict[str, int]:
    roles = {"text": layout.text, "label": layout.label, "pair": layout.pair}
    return {role: col for role, col in roles.items() if isinstance(col, int)}


def _glue_header(path: Path, line: int, row: list[str], layout: _TsvLayout) -> dict[str, int]:
    header = [c.strip() for c in row]
    roles = {"text": layout.text, "label": layout.label, "pair": layout.pair}
    wanted = {role: col for role, col in roles.items() if isinstance(col, str)}
    missing = [col for col in wanted.values() if col not in header]
    if missing:
        raise DataError(
            f"{path}:{line}: header {header} lacks column(s) {missing}; expected a header row naming "
            f"{list(wanted.values())} (GLUE TSV layout)"
        )
    return {role: header.index(col) for role, col in wanted.items()}


def _describe_layout(layout: _TsvLayout) -> str:
    if layout.header:
        cols = [c for c in (layout.label, layout.text, layout.pair) if c is not None]
        return f"a header row naming {cols}, then one row per example, tab-separated"
    return (
        f"{layout.n_columns} tab-separated columns and no header row "
        f"(label in column {layout.label}, sentence in column {layout.text}, counting from 0)"
    )


def _load_glue_hf(spec: TaskSpec, split: str) -> TextDataset:
    """Fallback: the Hugging Face copy. Its label ids match GLUE's (and so ``spec.label_names``)."""
    hf_split = "validation" if split == "dev" else "train"
    how_to_fix = (
        f"pass --data-dir pointing at a folder with {_layout_hint()}; "
        f"or set {ENV_DATA_DIR} to such a folder; "
        "or `pip install datasets` on a machine with internet access to download GLUE from Hugging Face"
    )
    try:
        import datasets  # type: ignore[import-not-found]  # optional; only this fallback needs it
    except ImportError as exc:
        raise DataError(
            f"no local GLUE data found for {spec.glue_dir} and the `datasets` package is not installed. "
            f"To fix: {how_to_fix}."
        ) from exc
    try:
        ds = datasets.load_dataset("glue", spec.name, split=hf_split)
    except Exception as exc:  # network, hub and cache errors have no common base class
        raise DataError(
            f"no local GLUE data found for {spec.glue_dir} and downloading glue/{spec.name} with `datasets` "
            f"failed ({type(exc).__name__}: {exc}). To fix: {how_to_fix}."
        ) from exc
    source = f"huggingface datasets glue/{spec.name} [{hf_split}]"
    text_col, pair_col = ("sentence1", "sentence2") if spec.is_pair else ("sentence", None)
    try:
        texts = [str(t) for t in ds[text_col]]
        pairs = [str(t) for t in ds[pair_col]] if pair_col else None
        labels = np.asarray(list(ds["label"]), dtype=np.int64)
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{source}: unexpected columns ({exc}); {how_to_fix}") from exc
    return TextDataset(texts, pairs, labels, spec.label_names, source)


# --------------------------------------------------------------------------------------------------
# User files
# --------------------------------------------------------------------------------------------------

_FILE_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
_INT_RE = re.compile(r"[+-]?\d+")


def load_file(path: str | os.PathLike[str], label_names: Sequence[str] | None = None) -> TextDataset:
    """Load a user's own labelled texts from CSV (with a header row) or JSON Lines (``.jsonl``/``.json``).

    Fields: ``text`` (required), ``text_pair`` (optional, but then on every row), ``label`` (required).
    A label is an integer id ``0..K-1`` or a string name. String names are mapped through
    ``label_names`` when given, otherwise ``label_names`` becomes the sorted unique names, so the
    id assignment is deterministic and does not depend on row order. CSV cells are always text, so a
    cell like ``"1"`` counts as the integer id 1. Mixing ids and names in one file is refused: it is
    ambiguous which id a name was meant to have.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path} is not a file; pass a .csv or .jsonl file")
    kind = _FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unsupported file extension {path.suffix!r}; use .csv (header row with text,label "
            "[,text_pair]) or .jsonl/.json (one JSON object per line with those fields)"
        )
    if label_names is not None:
        label_names = _check_label_names(path, label_names)
    try:
        records = _read_csv(path) if kind == "csv" else _read_jsonl(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if not records:
        raise DataError(f"{path} has no data rows; expected fields text, label (and optionally text_pair)")
    texts = [r.text for r in records]
    pairs = _consistent_pairs(path, records)
    labels, names = _resolve_labels(path, records, label_names)
    return TextDataset(texts, pairs, labels, names, str(path))


@dataclass
class CalibrationTexts:
    """A user's own calibration samples: labelled (a TextDataset's fields) or not (``labels`` None)."""

    texts: list[str]
    text_pairs: list[str] | None
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def load_calibration_file(path: str | os.PathLike[str], label_names: Sequence[str]) -> CalibrationTexts:
    """Calibration samples from CSV/JSONL as for training (``label`` optional: absent on every row
    means unlabelled) or a plain text file (``.txt``: one text per non-empty line, unlabelled).

    Unlabelled samples can only calibrate the disagreement with the final exit (``--reference final``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"calibration file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            texts = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
            if not texts:
                raise DataError(f"{path} has no non-empty line")
            return CalibrationTexts(texts, None, None, str(path))
        if _FILE_SUFFIXES.get(suffix) is None:
            raise DataError(f"{path}: unsupported extension {suffix!r}; use .csv, .jsonl/.json or .txt")
        rows = _unlabelled_rows(path, _FILE_SUFFIXES[suffix])
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if any("label" in row for row in rows):
        ds = load_file(path, label_names)  # labelled: every row must carry one, checked there
        return CalibrationTexts(ds.texts, ds.text_pairs, ds.labels, ds.source)
    texts, pairs = [], []
    for i, row in enumerate(rows, start=1):
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: row {i}: missing or empty 'text'")
        texts.append(text)
        pairs.append(row.get("text_pair"))
    has_pair = [isinstance(p, str) and bool(p.strip()) for p in pairs]
    if any(has_pair) and not all(has_pair):
        raise DataError(f"{path}: text_pair on some rows only; give it on every row or on none")
    return CalibrationTexts(texts, pairs if all(has_pair) else None, None, str(path))


def _unlabelled_rows(path: Path, kind: str) -> list[dict]:
    """Rows as dicts of the fields present (empty CSV cells dropped), for sniffing and unlabelled use."""
    if kind == "csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = [{k: v for k, v in row.items() if k and v not in (None, "")} for row in csv.DictReader(f)]
    else:
        rows = []
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {lineno}: malformed JSON ({exc.msg})") from exc
                if not isinstance(obj, dict):
                    raise DataError(f"{path}: line {lineno}: expected a JSON object with a 'text' field")
                rows.append({k: v for k, v in obj.items() if v is not None})
    if not rows:
        raise DataError(f"{path} has no data rows")
    return rows


@dataclass(frozen=True)
class _Record:
    where: str  # "line 7": for error messages
    text: str
    pair: str | None
    label: int | str


def _check_label_names(path: Path, label_names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(label_names, str):
        raise DataError(f"label_names must be a sequence of names, not the string {label_names!r}")
    names = tuple(label_names)
    if not names:
        raise DataError("label_names is empty")
    if not all(isinstance(n, str) for n in names):
        raise DataError(f"label_names must all be strings, got {names!r}")
    if len(set(names)) != len(names):
        raise DataError(f"label_names has duplicates: {names!r}")
    return names


def _read_csv(path: Path) -> list[_Record]:
    records: list[_Record] = []
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: Excel writes a BOM
        reader = csv.reader(f)
        header: list[str] | None = None
        cols: dict[str, int] = {}
        next_line = 1  # reader.line_num is a record's *last* line (quoted fields may span lines)
        try:
            for row in reader:
                where = f"line {next_line}"
                next_line = reader.line_num + 1
                if not row or not any(c.strip() for c in row):
                    continue
                if header is None:
                    header = [c.strip() for c in row]
                    missing = [c for c in ("text", "label") if c not in header]
                    if missing:
                        raise DataError(
                            f"{path}: {where}: header {header} lacks column(s) {missing}; the first row must "
                            "name the columns: text,label (and optionally text_pair)"
                        )
                    cols = {c: header.index(c) for c in ("text", "label", "text_pair") if c in header}
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}: {where}: row has {len(row)} fields but the header has {len(header)}; "
                        "quote fields that contain commas"
                    )
                pair = row[cols["text_pair"]] if "text_pair" in cols else None
                label: int | str = row[cols["label"]].strip()
                records.append(_make_record(path, where, row[cols["text"]], pair, label))
        except csv.Error as exc:
            raise DataError(f"{path}: line {reader.line_num}: cannot parse as CSV: {exc}") from exc
    if header is None:
        raise DataError(f"{path} is empty; expected a header row text,label (and optionally text_pair)")
    return records


def _read_jsonl(path: Path) -> list[_Record]:
    records: list[_Record] = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"line {lineno}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                hint = ""
                if line.lstrip().startswith("["):
                    hint = "; this looks like a JSON array, but the file must hold one JSON object per line"
                raise DataError(f"{path}: {where}: malformed JSON ({exc.msg}){hint}") from exc
            if not isinstance(obj, dict):
                raise DataError(
                    f"{path}: {where}: expected a JSON object like "
                    f'{{"text": ..., "label": ...}}, got {type(obj).__name__}'
                )
            for key in ("text", "label"):
                if key not in obj or obj[key] is None:
                    raise DataError(f"{path}: {where}: missing field {key!r} (each line needs text and label)")
            label = obj["label"]
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise DataError(
                    f"{path}: {where}: label must be an integer id or a string name, got {json.dumps(label)}"
                )
            text, pair = obj["text"], obj.get("text_pair")
            for key, value in (("text", text), ("text_pair", pair)):
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{path}: {where}: {key!r} must be a string, got {json.dumps(value)}")
            records.append(_make_record(path, where, text, pair, label))
    return records


def _make_record(path: Path, where: str, text: str, pair: str | None, label: int | str) -> _Record:
    if not text.strip():
        raise DataError(f"{path}: {where}: empty text")
    if isinstance(label, str):
        if not label.strip():
            raise DataError(f"{path}: {where}: empty label")
        if _INT_RE.fullmatch(label.strip()):
            label = int(label)
    # An empty text_pair counts as absent, so CSV (where the cell always exists) and JSONL agree.
    return _Record(where, text, pair if pair is not None and pair.strip() else None, label)


def _consistent_pairs(path: Path, records: list[_Record]) -> list[str] | None:
    """All rows have a text_pair, or none do: a model is either a pair model or not, and filling the
    gaps with empty strings would quietly train it on a different input format."""
    have = [r.pair is not None for r in records]
    if not any(have):
        return None
    if all(have):
        return [r.pair for r in records if r.pair is not None]
    odd = next(r for r, h in zip(records, have, strict=True) if h != have[0])
    first = "has" if have[0] else "lacks"
    this = "lacks" if have[0] else "has"
    raise DataError(
        f"{path}: {odd.where} {this} text_pair but {records[0].where} {first} it; "
        "text_pair must be on every row or on none"
    )


def _resolve_labels(
    path: Path, records: list[_Record], label_names: tuple[str, ...] | None
) -> tuple[np.ndarray, tuple[str, ...]]:
    ids: list[int] = []
    if label_names is not None:
        index = {n: i for i, n in enumerate(label_names)}
        for r in records:
            if isinstance(r.label, str):
                if r.label not in index:
                    raise DataError(
                        f"{path}: {r.where}: unknown label {r.label!r}; label_names are {list(label_names)}"
                    )
                ids.append(index[r.label])
            elif 0 <= r.label < len(label_names):
                ids.append(r.label)
            else:
                raise DataError(
                    f"{path}: {r.where}: label id {r.label} is out of range 0..{len(label_names) - 1} "
                    f"for label_names {list(label_names)}"
                )
        return np.asarray(ids, dtype=np.int64), label_names

    is_int = [isinstance(r.label, int) for r in records]
    if all(is_int):
        neg = next((r for r in records if isinstance(r.label, int) and r.label < 0), None)
        if neg is not None:
            raise DataError(f"{path}: {neg.where}: label id {neg.label} is negative; ids must be 0..K-1")
        labels = np.asarray([r.label for r in records], dtype=np.int64)
        names = tuple(str(i) for i in range(int(labels.max()) + 1))
        return labels, names
    if any(is_int):
        first_int = next(r for r, i in zip(records, is_int, strict=True) if i)
        first_str = next(r for r, i in zip(records, is_int, strict=True) if not i)
        raise DataError(
            f"{path}: mixes integer label ids ({first_int.where}: {first_int.label}) and label names "
            f"({first_str.where}: {first_str.label!r}); use one kind, or pass label_names to map names to ids"
        )
    names = tuple(sorted({str(r.label) for r in records}))
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[str(r.label)] for r in records], dtype=np.int64), names
