"""The audit path off the answer's critical path: a bounded queue and one background thread.

The request path only ever calls ``submit``, which never blocks: a full queue drops the audit (counted as
"queue_full"), so under load audits go first and answers are never slowed by them. The thread sends each
audit to the edge on a channel of its own (a failed audit never marks the user path's tier down), drops it
when a tier is down or slow, records outcomes in the ``AuditMonitor`` and saves its state atomically at most
every ``save_every_s`` (5 s: a Pi's SD card is not written on every answer). ``close`` waits at most
``grace_s`` for the thread; a frozen cloud can delay it by no more than one audit's timeout, and never an
answer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cartosplit.device_runtime import audit_state
from cartosplit.device_runtime.audit import AuditMonitor
from cartosplit.device_runtime.audit_state import AuditLog

log = logging.getLogger("cartosplit.audit")


@dataclass
class AuditJob:
    """One sampled answer. ``hidden`` set: an early answer, to be re-sent to the edge at the device depth;
    None: a cloud answer, recorded as it is (``final`` its probabilities, ``edge`` those the edge gave)."""

    tier: int  # costs.TIER_* that answered
    answer: int
    router: np.ndarray | None
    device: np.ndarray | None  # None: the router sent the sample on before the device exit ran
    edge: np.ndarray | None = None
    final: np.ndarray | None = None
    hidden: np.ndarray | None = None


class AuditWorker:
    """``send(job)`` makes the audit request and returns (reply, request bytes) or raises; it is the runtime's
    bridge to gRPC, so this module stays testable without a server."""

    def __init__(
        self,
        monitor: AuditMonitor,
        send: Callable[[AuditJob], tuple[object, int]],
        state_path: str | Path | None = None,
        queue_size: int = 256,
        save_every_s: float = 5.0,
    ) -> None:
        self.monitor, self._send = monitor, send
        self.state_path = None if state_path is None else Path(state_path)
        self.save_every_s = save_every_s
        self._queue: queue.Queue[AuditJob | None] = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        self._last_save = 0.0
        self._thread = threading.Thread(target=self._run, name="cartosplit-audit", daemon=True)
        self._thread.start()

    def submit(self, job: AuditJob) -> None:
        """Queue an audit or drop it; never blocks."""
        if self._stopping.is_set():
            self.monitor.drop("stopping")
            return
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.monitor.drop("queue_full")

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                break
            try:
                self._handle(job)
            except Exception:  # an audit must never take the thread down: log and go on
                log.exception("audit failed")
                self.monitor.drop("error")
            self._maybe_save()
        self._maybe_save(force=True)

    def _handle(self, job: AuditJob) -> None:
        if job.hidden is None:  # a cloud answer: the reference itself, nothing to send
            # a sample the router sent to the cloud stays there all along the path (its margins do not
            # move), so the exits it skipped are filled with the final one's: they never decide its loss
            device = job.final if job.device is None else job.device
            edge = job.final if job.edge is None else job.edge
            row = AuditLog.row(job.router, device, edge, job.final)
            self.monitor.record(job.tier, job.answer, job.final, row)
            return
        try:
            reply, size = self._send(job)
        except Exception as exc:  # grpc.RpcError, tier down: the audit is dropped, never retried
            reason = getattr(getattr(exc, "code", lambda: None)(), "name", None) or type(exc).__name__
            self.monitor.drop(str(reason).lower())
            return
        final = np.asarray(reply.probabilities, dtype=np.float64)
        edge_probs = np.asarray(reply.edge_probabilities, dtype=np.float64)
        if reply.degraded or len(edge_probs) != len(final) or job.device is None or len(final) != len(job.device):
            self.monitor.drop("no_cloud_answer")  # the edge answered alone: no reference
            return
        edge = edge_probs if job.edge is None else job.edge  # an edge answer keeps the probabilities it gave
        row = AuditLog.row(job.router, job.device, edge, final)
        self.monitor.record(job.tier, job.answer, final, row, sent_bytes=size)

    def _maybe_save(self, force: bool = False) -> None:
        if self.state_path is None or not self.monitor.changed:
            return
        now = time.monotonic()
        if not force and now - self._last_save < self.save_every_s:
            return
        try:
            self.monitor.changed = False
            audit_state.save(self.monitor.state(), self.state_path)
            self._last_save = now
        except OSError:
            self.monitor.changed = True
            log.exception("audit state not saved to %s", self.state_path)

    def close(self, grace_s: float = 2.0) -> None:
        """Stop taking audits, let the thread finish what it holds within ``grace_s``, save the state."""
        self._stopping.set()
        while True:  # make room for the stop sign: queued audits are dropped, not waited for
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.monitor.drop("stopping")
                except queue.Empty:
                    pass
        self._thread.join(grace_s)
