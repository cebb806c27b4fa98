"""Shared by the latency benchmarks: the device slice as the device runs it, thread pinning, a timed loop.

``DeviceSlice`` runs ``device_head`` (embeddings, layers 1..r, router) then ``device_tail`` (layers
r+1..d, device exit): the path of every input the device answers or hands to the edge.
onnxruntime graphs take any batch and length. TFLite graphs have fixed shapes, batch 1, one file per
sequence bucket: each row is padded to the smallest bucket that holds the batch's width and run on its
own, so a batch of B is B calls (the interpreter cannot be resized: litert-torch bakes the batch into
its reshapes, and ``resize_tensor_input`` to batch 8 fails in RESHAPE). Torch-free.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from cartosplit.device_runtime.bundle import Bundle
from cartosplit.device_runtime.runtime import DeviceGraphs


@dataclass
class DeviceOutputs:
    router_logits: np.ndarray  # [B, 3]
    hidden_r: np.ndarray  # [B, S, H] at the router depth
    hidden_d: np.ndarray  # [B, S, H] at the device exit depth
    device_logits: np.ndarray  # [B, K]
    head_s: float  # seconds spent in device_head (all rows)
    tail_s: float  # seconds spent in device_tail (all rows)


class DeviceSlice(DeviceGraphs):
    """``device_head`` then ``device_tail`` of a bundle, in one format (onnx-* or tflite-*), opened as the
    runtime opens them; :meth:`run` times each graph over a whole batch."""

    def __init__(self, bundle: Bundle, fmt: str, threads: int | None = None) -> None:
        if fmt not in bundle.manifest.formats:
            raise ValueError(f"bundle has no {fmt} graphs (formats: {sorted(bundle.manifest.formats)})")
        super().__init__(bundle, fmt, threads)

    def run(self, tokens: dict[str, np.ndarray]) -> DeviceOutputs:
        """``tokens``: ``input_ids``, ``attention_mask``, ``token_type_ids`` [B, S] (as from ``pad_batch``)."""
        ids, mask, types = tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"]
        if self.buckets is None:
            began = time.perf_counter()
            router_logits, hidden_r = self.head.run([ids, mask, types])
            middle = time.perf_counter()
            hidden_d, logits = self.tail.run([hidden_r, mask])
            return DeviceOutputs(
                router_logits, hidden_r, hidden_d, logits, middle - began, time.perf_counter() - middle
            )
        from cartosplit.device_runtime.buckets import bucket_for, pad_to

        width = ids.shape[1]
        bucket = bucket_for(width, self.buckets)
        head, tail = self.sessions[("device_head", bucket)], self.sessions[("device_tail", bucket)]
        rows, head_s, tail_s = [], 0.0, 0.0
        for i in range(ids.shape[0]):
            row_ids, row_mask, row_types = (pad_to(x[i : i + 1], bucket) for x in (ids, mask, types))
            began = time.perf_counter()
            router_logits, hidden_r = head.run([row_ids, row_mask, row_types])
            middle = time.perf_counter()
            hidden_d, logits = tail.run([hidden_r, row_mask])
            head_s += middle - began
            tail_s += time.perf_counter() - middle
            rows.append((router_logits, hidden_r[:, :width], hidden_d[:, :width], logits))
        router_logits, hidden_r, hidden_d, logits = (np.concatenate(parts) for parts in zip(*rows, strict=True))
        return DeviceOutputs(router_logits, hidden_r, hidden_d, logits, head_s, tail_s)


# -- threads ------------------------------------------------------------------------------------------------


def available_cores() -> list[int]:
    """The cores this process may run on (all of them when the OS cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@contextlib.contextmanager
def pinned(cores: list[int]) -> Iterator[list[int]]:
    """Run the body on ``cores`` only (threads created inside inherit it), then restore the old set.

    Linux only (``os.sched_setaffinity``); elsewhere the body runs unpinned and the empty list says so.
    """
    if not hasattr(os, "sched_setaffinity"):
        yield []
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield sorted(os.sched_getaffinity(0))
    finally:
        os.sched_setaffinity(0, before)


# -- timing -------------------------------------------------------------------------------------------------


@dataclass
class Timed:
    ms: list[float]  # wall time of each timed call
    results: list  # what each call returned


def time_calls(
    fn: Callable[[], object],
    min_runs: int = 50,
    min_seconds: float = 1.0,
    warmup: int = 5,
    max_runs: int = 100_000,
) -> Timed:
    """Call ``fn`` ``warmup`` times untimed, then at least ``min_runs`` times and for at least
    ``min_seconds`` of timed calls (at most ``max_runs``), one ``perf_counter`` pair per call."""
    if min_runs < 1 or max_runs < min_runs:
        raise ValueError(f"need 1 <= min_runs <= max_runs, got {min_runs} and {max_runs}")
    for _ in range(warmup):
        fn()
    ms, results, spent = [], [], 0.0
    while len(ms) < max_runs and (len(ms) < min_runs or spent < min_seconds):
        began = time.perf_counter()
        results.append(fn())
        took = time.perf_counter() - began
        spent += took
        ms.append(1000.0 * took)
    return Timed(ms, results)


def summarize_ms(ms: list[float]) -> dict[str, float]:
    """p50, p95 and mean of a list of milliseconds (numpy's linear-interpolation percentiles)."""
    if not ms:
        raise ValueError("no timings to summarise")
    values = np.asarray(ms, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(values, 50)),
        "p95_ms": float(np.percentile(values, 95)),
        "mean_ms": float(values.mean()),
        "runs": len(ms),
    }
