"""The audit monitor's persisted state, written so that a crash or a torn write loses at most the last update.

What is kept (``AuditState``): the policy's id and thresholds (the sequences belong to them: a new policy
starts new ones), per answering tier its audit sequence (``audit_bound.TierAudit``: counts, alarm) and its
audit rate, the schema version and the time of writing; and, for ``audit.AuditMonitor``, the shipped
policy's id, where on the tightening path the policy now is, the recalibration log (``AuditLog``) and the
audit counters.

The file is JSON ``{"body": {...}, "sha256": "<hex>"}``, the checksum taken over the canonical JSON of the
body (sorted keys, no spaces, ASCII), so a torn or corrupted file is told from a good one. This envelope is
the same in every version; the body names its schema and version.

Writing (``save``), one writer per file (the runtime that owns it):
1. the new content goes to ``<name>.tmp`` in the same folder, flushed and ``os.fsync``-ed, so that the
   rename below never publishes a file whose data are not on disk;
2. the current file, if it verifies, is renamed to ``<name>.prev`` (the previous good state);
3. ``os.replace(tmp, path)``, atomic on POSIX: a reader sees the old file or the new one, never a mix;
4. the folder is fsync-ed, so that the renames themselves survive a power cut.
A crash between 2 and 3 leaves no main file and a good ``.prev``; one bad write (a corrupt new file) costs
only that update, since ``.prev`` still holds the one before.

Reading (``load``) never raises for a bad file: a missing, torn or corrupt file, a wrong checksum, another
schema or version, or invalid fields give ``None`` with the reason, then ``.prev`` is tried; the caller starts
fresh (``resume``) and logs the reason. Torch-free, stdlib only (numpy through audit_bound).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cartosplit.device_runtime.audit_bound import AuditConfig, AuditRateRule, TierAudit, audit_rate
from cartosplit.device_runtime.json_checks import (
    INT,
    NUMBER,
    NUMBERS,
    OBJECT,
    STR,
    Problems,
    at,
    item,
    nullable,
)
from cartosplit.device_runtime.policy import ExitSignals

SCHEMA = "cartosplit.audit_state"
VERSION = 2  # 2: the monitor's fields (anchor_id, path_index, generation, attempt, epoch, log, counters)
BODY = "audit_state"  # the path problems are named by
MAX_BYTES = 16 * 1024 * 1024  # far above any real state: a file this large is not ours


class AuditLog:
    """Audited samples' signals for recalibration, one row each: router probabilities (3; NaN without a
    router), then the device, edge and final exits' probabilities (K each). Float32, so a row of a
    two-label task is 36 bytes and the log of a recalibration (a few thousand rows) stays small on disk."""

    def __init__(self, rows: Sequence[Sequence[float]] = ()) -> None:
        self._rows = [np.asarray(r, dtype=np.float32) for r in rows]
        widths = {len(r) for r in self._rows}
        if len(widths) > 1 or any((w - 3) % 3 or w < 9 for w in widths):
            raise ValueError(f"audit log rows must all have 3 + 3K values (K >= 2 labels), got widths {sorted(widths)}")

    @staticmethod
    def row(router: np.ndarray | None, device: np.ndarray, edge: np.ndarray, final: np.ndarray) -> np.ndarray:
        router = np.full(3, np.nan, np.float32) if router is None else np.asarray(router, np.float32)
        return np.concatenate([router, *(np.asarray(p, np.float32) for p in (device, edge, final))])

    def append(self, row: np.ndarray) -> None:
        row = np.asarray(row, dtype=np.float32)
        if self._rows and len(row) != len(self._rows[0]):
            raise ValueError(f"audit log row has {len(row)} values, the log's rows {len(self._rows[0])}")
        self._rows.append(row)

    def __len__(self) -> int:
        return len(self._rows)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AuditLog):
            return NotImplemented
        return len(self) == len(other) and all(
            np.array_equal(a, b, equal_nan=True) for a, b in zip(self._rows, other._rows, strict=True)
        )

    __hash__ = None  # mutable

    def copy(self) -> AuditLog:
        log = AuditLog()
        log._rows = list(self._rows)
        return log

    def signals(self) -> ExitSignals:
        rows = np.stack(self._rows).astype(np.float64)
        k = (rows.shape[1] - 3) // 3
        router = None if np.isnan(rows[:, :3]).any() else rows[:, :3]
        return ExitSignals(rows[:, 3 : 3 + k], rows[:, 3 + k : 3 + 2 * k], rows[:, 3 + 2 * k :], router)

    def to_list(self) -> list[list[float | None]]:
        # the shortest decimal that reads back as the same float32 (~9 characters, not float64's 17)
        return [
            [None if math.isnan(v) else float(np.format_float_positional(v, unique=True)) for v in r]
            for r in self._rows
        ]

    @classmethod
    def from_list(cls, raw: list) -> AuditLog:
        return cls([[math.nan if v is None else v for v in r] for r in raw])


@dataclass
class AuditState:
    """The monitor's state under one policy; ``thresholds`` may hold ``math.inf`` ("never"), written as null."""

    policy_id: str
    thresholds: dict[str, float]
    tiers: dict[str, TierAudit]
    audit_rates: dict[str, float]
    written_at: float | None = None  # unix time of the last save
    version: int = VERSION
    # audit.AuditMonitor's: the shipped policy it adapts, its place on the path, the recalibration log
    anchor_id: str | None = None
    path_index: int | None = None
    generation: int = 0
    attempt: int = 0
    epoch: int = 1
    log: AuditLog = field(default_factory=AuditLog)
    counters: dict | None = None

    def __post_init__(self) -> None:
        for name, value in self.thresholds.items():
            if math.isnan(value) or value == -math.inf:
                raise ValueError(f"thresholds[{name!r}] must be a number or +inf (never), got {value}")
        for name, rate in self.audit_rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"audit_rates[{name!r}] must be a probability in [0, 1], got {rate}")
        if set(self.audit_rates) != set(self.tiers):
            raise ValueError(
                f"audit_rates must name the same tiers as tiers, got {sorted(self.audit_rates)} "
                f"and {sorted(self.tiers)}"
            )
        for name, tier in self.tiers.items():
            if tier.tier != name or tier.policy_id != self.policy_id:
                raise ValueError(
                    f"tiers[{name!r}] belongs to tier {tier.tier!r} under policy {tier.policy_id!r}, "
                    f"expected tier {name!r} under policy {self.policy_id!r}"
                )

    def matches(self, policy_id: str, thresholds: dict[str, float]) -> bool:
        """Whether this state's sequences belong to the policy now in force."""
        return self.policy_id == policy_id and self.thresholds == thresholds

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "version": self.version,
            "policy_id": self.policy_id,
            "thresholds": {k: (None if math.isinf(v) else float(v)) for k, v in self.thresholds.items()},
            "tiers": {name: tier.to_dict() for name, tier in self.tiers.items()},
            "audit_rates": {k: float(v) for k, v in self.audit_rates.items()},
            "written_at": self.written_at,
            "anchor_id": self.anchor_id,
            "path_index": self.path_index,
            "generation": self.generation,
            "attempt": self.attempt,
            "epoch": self.epoch,
            "log": self.log.to_list(),
            "counters": self.counters,
        }

    @classmethod
    def read(cls, raw: dict, problems: Problems) -> AuditState | None:
        """A body whose schema and version were checked; None if any field is wrong (the problems noted)."""
        before = len(problems.found)
        policy_id = problems.take(raw, BODY, "policy_id", STR)
        thresholds = problems.take(raw, BODY, "thresholds", OBJECT)
        for name, value in (thresholds or {}).items():
            problems.check(value, item(at(BODY, "thresholds"), name), nullable(NUMBER))
        tiers_raw = problems.take(raw, BODY, "tiers", OBJECT)
        tiers = {
            name: TierAudit.read(tier, item(at(BODY, "tiers"), name), problems)
            for name, tier in (tiers_raw or {}).items()
        }
        audit_rates = problems.take(raw, BODY, "audit_rates", NUMBERS)
        written_at = problems.take(raw, BODY, "written_at", nullable(NUMBER))
        monitor = {
            "anchor_id": problems.take(raw, BODY, "anchor_id", nullable(STR), required=False),
            "path_index": problems.take(raw, BODY, "path_index", nullable(INT), required=False),
            "generation": problems.take(raw, BODY, "generation", INT, required=False),
            "attempt": problems.take(raw, BODY, "attempt", INT, required=False),
            "epoch": problems.take(raw, BODY, "epoch", INT, required=False),
            "counters": problems.take(raw, BODY, "counters", nullable(OBJECT), required=False),
        }
        log = problems.take(raw, BODY, "log", ("a list of rows", lambda v: isinstance(v, list)), required=False)
        problems.only(
            raw,
            BODY,
            ["schema", "version", "policy_id", "thresholds", "tiers", "audit_rates", "written_at", *monitor, "log"],
        )
        if len(problems.found) > before:
            return None
        try:
            return cls(
                policy_id=policy_id,
                thresholds={k: (math.inf if v is None else float(v)) for k, v in thresholds.items()},
                tiers=tiers,
                audit_rates={k: float(v) for k, v in audit_rates.items()},
                written_at=None if written_at is None else float(written_at),
                anchor_id=monitor["anchor_id"],
                path_index=monitor["path_index"],
                generation=monitor["generation"] or 0,
                attempt=monitor["attempt"] or 0,
                epoch=monitor["epoch"] or 1,
                log=AuditLog.from_list(log or []),
                counters=monitor["counters"],
            )
        except ValueError as exc:
            problems.add(str(exc))
            return None


def fresh(
    policy_id: str,
    thresholds: dict[str, float],
    tiers: Iterable[str],
    config: AuditConfig,
    rule: AuditRateRule | None = None,
) -> AuditState:
    """New sequences for every answering tier under this policy, each audited at the rule's starting rate."""
    sequences = {name: TierAudit(tier=name, policy_id=policy_id, config=config) for name in tiers}
    rates = {name: audit_rate(seq.upper_bound(), config.epsilon, seq.alarm, rule) for name, seq in sequences.items()}
    return AuditState(policy_id=policy_id, thresholds=dict(thresholds), tiers=sequences, audit_rates=rates)


# --- the file format --------------------------------------------------------------------------------------


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def encode(state: AuditState) -> bytes:
    """The file's bytes: the body and the sha256 of its canonical JSON."""
    body = state.to_dict()
    digest = hashlib.sha256(_canonical(body)).hexdigest()
    return (json.dumps({"body": body, "sha256": digest}, sort_keys=True, indent=1, allow_nan=False) + "\n").encode()


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _body(data: bytes) -> tuple[dict | None, str | None]:
    """The checked body of a file's bytes, or None and what is wrong with it."""
    try:
        envelope = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        return None, "is not UTF-8 text (corrupt)"
    except (ValueError, RecursionError) as exc:
        return None, f"is not valid JSON (torn or corrupt write?): {exc}"
    if not isinstance(envelope, dict) or set(envelope) != {"body", "sha256"}:
        return None, 'is not an audit state file (expected an object with exactly "body" and "sha256")'
    body, digest = envelope["body"], envelope["sha256"]
    if not isinstance(body, dict) or not isinstance(digest, str):
        return None, '"body" must be an object and "sha256" a string'
    try:
        actual = hashlib.sha256(_canonical(body)).hexdigest()
    except ValueError as exc:  # e.g. a number corrupted into 1e999 (inf)
        return None, f"has a body that is not canonical JSON: {exc}"
    if actual != digest:
        return None, f"fails its checksum (torn or corrupt write): sha256 {actual[:12]}..., recorded {digest[:12]}..."
    if body.get("schema") != SCHEMA:
        return None, f'has schema {body.get("schema")!r}, expected "{SCHEMA}"'
    if body.get("version") != VERSION:
        return None, (
            f"has schema version {body.get('version')!r}; this cartosplit reads version {VERSION} "
            "(written by another cartosplit: upgrade it, or start fresh)"
        )
    return body, None


def decode(data: bytes) -> tuple[AuditState | None, str | None]:
    """The state in a file's bytes, or None and the reason; never raises for bad content."""
    body, reason = _body(data)
    if body is None:
        return None, reason
    problems = Problems()
    try:
        state = AuditState.read(body, problems)
    except (ValueError, TypeError, OverflowError) as exc:  # a checksummed but hand-made body, e.g. 1e400 as an int
        return None, f"has unreadable fields: {exc}"
    if state is None:
        return None, "has invalid fields: " + "; ".join(problems.found)
    return state, None


def read_state(path: str | Path) -> tuple[AuditState | None, str | None]:
    """One file's state, or None and the reason (missing, unreadable, torn, corrupt, another version)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            return None, f"audit state {path} is larger than {MAX_BYTES} bytes (not an audit state)"
        data = path.read_bytes()
    except FileNotFoundError:
        return None, f"audit state {path} does not exist"
    except OSError as exc:
        return None, f"audit state {path} cannot be read: {exc}"
    state, reason = decode(data)
    return state, None if state is not None else f"audit state {path} {reason}"


# --- writing and loading ----------------------------------------------------------------------------------


def prev_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".prev")


def tmp_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (POSIX; Windows has no directory handles to sync)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(state: AuditState, path: str | Path, now: float | None = None) -> AuditState:
    """Write ``state`` atomically at ``path`` (the module docstring says how); returns it stamped with the time."""
    path = Path(path)
    stamped = replace(state, written_at=time.time() if now is None else float(now))
    data = encode(stamped)
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if read_state(path)[0] is not None:  # only a good file becomes .prev: a bad one must not evict it
        os.replace(path, prev_path(path))
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return stamped


@dataclass(frozen=True)
class Loaded:
    """What ``load`` found: the state (None: start fresh), the file it came from ("main", "prev" or None),
    and why the files before it were not used."""

    state: AuditState | None
    source: str | None
    problems: tuple[str, ...] = ()

    @property
    def reason(self) -> str | None:
        return "; ".join(self.problems) or None


def load(path: str | Path) -> Loaded:
    """The state at ``path``, else at ``path.prev``, else none; every failure is a reason, never an exception."""
    problems = []
    for source, candidate in (("main", Path(path)), ("prev", prev_path(path))):
        state, reason = read_state(candidate)
        if state is not None:
            return Loaded(state, source, tuple(problems))
        problems.append(reason)
    return Loaded(None, None, tuple(problems))


def resume(
    loaded: Loaded,
    policy_id: str,
    thresholds: dict[str, float],
    tiers: Iterable[str],
    config: AuditConfig,
    rule: AuditRateRule | None = None,
) -> tuple[AuditState, str | None]:
    """The loaded state if it belongs to this policy, tier set and promise, else a fresh one; with a note
    for the log (why fresh, or that ``.prev`` was used), None when the main file resumed as is."""
    tiers = list(tiers)
    state = loaded.state
    if state is None:
        return fresh(policy_id, thresholds, tiers, config, rule), f"starting fresh: {loaded.reason}"
    if not state.matches(policy_id, thresholds):
        return fresh(policy_id, thresholds, tiers, config, rule), (
            f"starting fresh: the saved state is for policy {state.policy_id!r}, now {policy_id!r} "
            "(new thresholds change the disagreement rate: a new policy starts new sequences)"
        )
    if set(state.tiers) != set(tiers) or any(seq.config != config for seq in state.tiers.values()):
        return fresh(policy_id, thresholds, tiers, config, rule), (
            f"starting fresh: the saved state covers tiers {sorted(state.tiers)} under another promise "
            f"or tier set than {sorted(tiers)} at epsilon {config.epsilon}, alpha {config.alpha}"
        )
    return state, (f"resumed from {loaded.source}: {loaded.reason}" if loaded.problems else None)
