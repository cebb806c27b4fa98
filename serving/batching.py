"""Dynamic batching: samples queued by many request threads run through a graph together, padded to one length.

A batch closes when it is full or ``max_wait_ms`` after its first sample arrived, so a lone request waits
at most that long while a busy server fills its batches.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cartosplit.serving.backends import GraphSession


class BatcherClosed(RuntimeError):
    """Work submitted to a batcher that has stopped (the server is shutting down)."""


@dataclass
class BatchResult:
    outputs: list[np.ndarray]  # this sample's outputs, padding removed
    queue_ms: float  # from submit until its batch started
    compute_ms: float  # its share of the batch's model time
    batch_size: int


@dataclass
class _Item:
    arrays: tuple[np.ndarray, ...]
    future: concurrent.futures.Future
    enqueued: float = field(default_factory=time.perf_counter)


_STOP = object()


class Batcher:
    """Dynamic batching for one graph: one worker thread pads queued samples and runs them together.

    ``kind`` is ``"hidden"`` (samples are ([S, H] float32,)) or ``"tokens"`` (([S] ids, [S] type ids)).
    A batch closes when it holds ``max_batch`` samples or ``max_wait_ms`` after its first sample arrived.
    When the session allows several batches at once (``max_in_flight`` > 1), closed batches run on helper
    threads so the worker can close the next one meanwhile; otherwise the worker runs each batch itself.
    """

    def __init__(
        self,
        session: GraphSession,
        max_batch: int,
        max_wait_ms: float,
        kind: str,
        name: str = "",
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if kind not in ("hidden", "tokens"):
            raise ValueError(f"batcher kind must be 'hidden' or 'tokens', got {kind!r}")
        self.session, self.kind, self.name = session, kind, name
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1000.0
        self._on_batch = on_batch
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self.max_in_flight = max(1, int(getattr(session, "max_in_flight", 1)))
        self._in_flight = threading.BoundedSemaphore(self.max_in_flight)
        self._runners = (
            concurrent.futures.ThreadPoolExecutor(self.max_in_flight, thread_name_prefix=f"batch-{name or kind}")
            if self.max_in_flight > 1
            else None
        )
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name or kind}", daemon=True)
        self._thread.start()

    def submit(self, *arrays: np.ndarray) -> concurrent.futures.Future:
        """Queue one sample; the future resolves to a :class:`BatchResult` or the batch's exception."""
        item = _Item(arrays, concurrent.futures.Future())
        with self._lock:  # so nothing slips in behind the stop marker
            if self._closed:
                raise BatcherClosed(f"batcher {self.name!r} is stopped")
            self._queue.put(item)
        return item.future

    def stop(self, timeout: float | None = None) -> None:
        """Finish the batches already queued, then end the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._runners is not None:  # the batches handed to helper threads finish too
            self._runners.shutdown(wait=True)

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stopping = self._collect(first)
            if self._runners is None:
                self._run(batch)
            else:
                self._in_flight.acquire()  # at most max_in_flight batches out at once: back-pressure
                self._runners.submit(self._run_and_release, batch)

    def _run_and_release(self, batch: list[_Item]) -> None:
        try:
            self._run(batch)
        finally:
            self._in_flight.release()

    def _collect(self, first: _Item) -> tuple[list[_Item], bool]:
        batch = [first]
        close_at = first.enqueued + self.max_wait_s
        while len(batch) < self.max_batch:
            wait = close_at - time.perf_counter()
            try:
                # past the window, still take whatever is already waiting: it costs no latency
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self, batch: list[_Item]) -> None:
        # a caller that gave up (deadline) cancelled its future: skip it rather than compute for nobody
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        started = time.perf_counter()
        try:
            outputs = self.session.run(self._pad(live))
        except Exception as exc:  # the worker must survive a failing batch
            for item in live:
                item.future.set_exception(exc)
            return
        compute_ms = (time.perf_counter() - started) * 1000.0 / len(live)
        if self._on_batch is not None:
            self._on_batch(len(live))
        for row, item in enumerate(live):
            length = len(item.arrays[0])
            mine = [np.array(out[row, :length] if out.ndim == 3 else out[row]) for out in outputs]
            queue_ms = (started - item.enqueued) * 1000.0
            item.future.set_result(BatchResult(mine, queue_ms, compute_ms, len(live)))

    def _pad(self, batch: list[_Item]) -> list[np.ndarray]:
        """Pad to the longest sample; the mask marks padding with zeros so the model ignores it."""
        lengths = [len(item.arrays[0]) for item in batch]
        longest = max(lengths)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, length in enumerate(lengths):
            mask[row, :length] = 1
        if self.kind == "hidden":
            hidden = np.zeros((len(batch), longest, batch[0].arrays[0].shape[1]), dtype=np.float32)
            for row, item in enumerate(batch):
                hidden[row, : lengths[row]] = item.arrays[0]
            feed = {"hidden_in": hidden, "attention_mask": mask}
        else:
            ids = np.zeros((len(batch), longest), dtype=np.int64)
            types = np.zeros_like(ids)
            for row, item in enumerate(batch):
                ids[row, : lengths[row]], types[row, : lengths[row]] = item.arrays
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return [feed[name] for name in self.session.input_names]
