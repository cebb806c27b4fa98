"""Where a tier's graphs run: onnxruntime in this process (the default) or a Ray Serve deployment.

The batcher sees only a :class:`GraphSession`; the backend decides what stands behind it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from cartosplit.device_runtime.bundle import Bundle
from cartosplit.device_runtime.onnx_backend import OnnxSession
from cartosplit.serving.config import ServerConfig


class GraphSession(Protocol):
    """What a batcher runs a padded batch on: onnxruntime here (OnnxSession) or a remote backend.

    ``run`` takes the inputs in ``input_names`` order and returns the graph's outputs in its order.
    A session may set ``max_in_flight`` > 1 (default 1) when it can usefully run several batches at once,
    e.g. a Ray deployment with several replicas.
    """

    input_names: list[str]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]: ...


class GraphBackend(Protocol):
    """Where a tier's graphs run. ``open_graphs`` gets ``{graph: kind}`` and returns a session per graph."""

    name: str

    def open_graphs(
        self, bundle: Bundle, graphs: dict[str, str], fmt: str, threads: int | None, tier: str
    ) -> dict[str, GraphSession]: ...

    def close(self) -> None: ...


class LocalBackend:
    """The default backend: each graph in an onnxruntime session inside this process."""

    name = "local"

    def open_graphs(
        self, bundle: Bundle, graphs: dict[str, str], fmt: str, threads: int | None, tier: str
    ) -> dict[str, GraphSession]:
        return {graph: OnnxSession(bundle.graph_file(graph, fmt), threads) for graph in graphs}

    def close(self) -> None:
        pass


def open_backend(config: ServerConfig) -> GraphBackend:
    """The backend ``config.backend`` names; the Ray one is imported only when asked for (optional extra)."""
    if config.backend == "ray":
        from cartosplit.serving.ray_backend import RayBackend

        return RayBackend(config.ray_address, config.ray_config, config.ray_app, config.max_batch)
    return LocalBackend()
