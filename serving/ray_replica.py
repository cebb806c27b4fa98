"""The replica side of a tier on Ray Serve: every graph of the tier in onnxruntime, behind ``@serve.batch``.

Micro-batches (from one front or from several) that share a graph and a padded length are concatenated into
one model run. Ray is imported only when the deployment is built, so this module imports without it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cartosplit.device_runtime.bundle import Bundle, load_bundle
from cartosplit.device_runtime.onnx_backend import OnnxSession
from cartosplit.serving.ray_settings import INSTALL_HINT, RaySettings


def import_ray() -> tuple[Any, Any]:
    """``ray`` and ``ray.serve``, or a ValueError with the install hint (Ray is an optional extra)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError(f"--backend ray needs Ray Serve, which is not installed: {INSTALL_HINT}") from None
    return ray, serve


def samples_in(micro_batches: list[tuple[str, dict[str, np.ndarray]]]) -> int:
    """``@serve.batch`` counts samples, not micro-batches, against max_batch_size."""
    return sum(len(next(iter(feed.values()))) for _, feed in micro_batches)


class SliceRunner:
    """A replica's model work, free of Ray: the tier's graphs in onnxruntime, micro-batches grouped by shape."""

    def __init__(
        self, bundle_folder: str, fmt: str, graphs: Sequence[str], threads: int | None, max_batch_size: int = 0
    ) -> None:
        bundle = load_bundle(bundle_folder)  # verifies every file's sha256: replicas run what the front checked
        missing = [g for g in graphs if g not in bundle.manifest.graphs]
        if missing:
            raise ValueError(f"{bundle_folder}: the bundle has no graphs {missing}")
        self.bundle_id, self.fmt, self.max_batch_size = bundle.bundle_id, fmt, max_batch_size
        self.sessions = {g: OnnxSession(bundle.graph_file(g, fmt), threads) for g in graphs}

    def describe(self) -> dict[str, object]:
        return {
            "bundle_id": self.bundle_id,
            "format": self.fmt,
            "graphs": sorted(self.sessions),
            "max_batch_size": self.max_batch_size,
        }

    def run(self, micro_batches: list[tuple[str, dict[str, np.ndarray]]]) -> list[list[np.ndarray]]:
        """One answer per micro-batch; those of one graph and one padded length run as one batch."""
        groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for index, (graph, feed) in enumerate(micro_batches):
            if graph not in self.sessions:
                raise ValueError(f"graph {graph!r} is not served by this deployment ({sorted(self.sessions)})")
            shape = tuple(next(iter(feed.values())).shape[1:2])
            groups.setdefault((graph, shape), []).append(index)
        answers: list[list[np.ndarray]] = [[] for _ in micro_batches]
        for (graph, _), members in groups.items():
            session = self.sessions[graph]
            feeds = [micro_batches[i][1] for i in members]
            inputs = [np.concatenate([f[name] for f in feeds]) for name in session.input_names]
            outputs = session.run(inputs)
            start = 0
            for i, feed in zip(members, feeds, strict=True):
                rows = len(next(iter(feed.values())))
                answers[i] = [out[start : start + rows] for out in outputs]
                start += rows
        return answers


_DEPLOYMENT = None


def slice_deployment() -> Any:
    """The Serve deployment class (built once, on first use, so that importing this module needs no Ray)."""
    global _DEPLOYMENT
    if _DEPLOYMENT is not None:
        return _DEPLOYMENT
    _, serve = import_ray()

    @serve.deployment(name="slices")
    class TierSlices:
        """Every graph of one tier, in onnxruntime, behind ``@serve.batch``."""

        def __init__(
            self,
            bundle_folder: str,
            fmt: str,
            graphs: list[str],
            max_batch_size: int,
            batch_wait_timeout_s: float,
            threads: int | None,
        ) -> None:
            self.runner = SliceRunner(bundle_folder, fmt, graphs, threads, max_batch_size)
            self.run_batch.set_max_batch_size(max_batch_size)
            self.run_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

        def describe(self) -> dict[str, object]:
            return self.runner.describe()

        async def __call__(self, graph: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            return await self.run_batch((graph, feed))

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, batch_size_fn=samples_in)
        async def run_batch(self, micro_batches: list[tuple[str, dict[str, np.ndarray]]]) -> list[list[np.ndarray]]:
            # onnxruntime releases the GIL: off the event loop, the replica keeps queueing the next batch
            return await asyncio.to_thread(self.runner.run, micro_batches)

    _DEPLOYMENT = TierSlices
    return TierSlices


def bind_application(
    bundle: Bundle, tier: str, fmt: str, graphs: Sequence[str], settings: RaySettings, threads: int | None
) -> Any:
    """The Serve application (not yet running) of one tier's graphs."""
    deployment = slice_deployment().options(name=f"{tier}-slices", **settings.deployment_options())
    return deployment.bind(
        str(Path(bundle.folder).resolve()),
        fmt,
        list(graphs),
        settings.max_batch_size,
        settings.batch_wait_timeout_s,
        settings.intra_op_threads or threads,
    )
