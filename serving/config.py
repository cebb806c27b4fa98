"""How one tier server runs: the settings both tiers share, checked when they are made."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cartosplit.protos.security import ServerSecurity

SERVER_FORMATS = ("onnx-int8", "onnx-fp32")
BACKENDS = ("local", "ray")


@dataclass
class ServerConfig:
    """How one tier server runs. ``port=0`` picks a free port (read it back from ``TierServer.port``)."""

    bundle: str | Path
    host: str = "127.0.0.1"  # loopback unless told otherwise: never expose a model by default
    port: int = 0
    fmt: str = "onnx-int8"
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_message_bytes: int = 16 * 1024 * 1024
    threads: int | None = None  # onnxruntime intra-op threads per graph; None = onnxruntime's default
    workers: int = 16  # grpc handler threads (and stream helper threads)
    metrics_port: int | None = None  # None = no HTTP endpoint; 0 = a free port (TierServer.metrics_port)
    grace_s: float = 5.0
    security: ServerSecurity | None = None  # TLS / mutual TLS / bearer token; None = plaintext, no auth
    # where the graphs run: "local" (onnxruntime in this process) or "ray" (a Ray Serve deployment; the extra
    # cartosplit[ray]). With "ray": ray_address None starts a local Ray, ray_config is a YAML/JSON file of
    # replicas, autoscaling and batching, ray_app attaches to an application someone else deployed (RayService).
    backend: str = "local"
    ray_address: str | None = None
    ray_config: str | Path | None = None
    ray_app: str | None = None

    def __post_init__(self) -> None:
        if self.fmt not in SERVER_FORMATS:
            raise ValueError(f"format {self.fmt!r} cannot be served; use one of {SERVER_FORMATS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is unknown; use one of {BACKENDS}")
        ray_settings = (self.ray_address, self.ray_config, self.ray_app)
        if self.backend != "ray" and any(v is not None for v in ray_settings):
            raise ValueError("--ray-address, --ray-config and --ray-app need --backend ray")
        if self.max_batch < 1 or self.max_wait_ms < 0 or self.workers < 1 or self.max_message_bytes < 1:
            raise ValueError("max_batch, workers and max_message_bytes must be >= 1 and max_wait_ms >= 0")
        if self.security is not None:
            self.security.check_host(self.host)  # a token without TLS: loopback only


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message limits both ways; grpc itself then refuses bigger messages with RESOURCE_EXHAUSTED."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
