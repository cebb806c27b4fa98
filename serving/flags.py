"""The command-line options both tier servers take, and the :class:`ServerConfig` they make."""

from __future__ import annotations

import argparse
import math

from cartosplit.protos.security import ServerSecurity
from cartosplit.serving.config import BACKENDS, SERVER_FORMATS, ServerConfig


def add_common_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--bundle", required=True, help="the bundle folder (cartosplit export)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port}; 0 = any)")
    parser.add_argument("--format", dest="fmt", choices=SERVER_FORMATS, default="onnx-int8", help="graph format")
    parser.add_argument("--max-batch", type=int, default=16, help="most samples per model run (default 16)")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long the first request of a batch waits for others (default 5 ms)",
    )
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads per graph")
    parser.add_argument("--workers", type=int, default=16, help="grpc handler threads (default 16)")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    parser.add_argument("--max-message-mb", type=float, default=16.0, help="largest message accepted (default 16)")
    parser.add_argument("--grace-s", type=float, default=5.0, help="time in-flight requests get on shutdown")
    parser.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (chain); needs --tls-key")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="mutual TLS: require client certificates signed by this CA (needs --tls-cert/--tls-key)",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="require 'authorization: Bearer <token>' on every call but health checks; the file holds the "
        "token (a file, not the token itself, so it never shows in ps). Needs TLS unless --host is loopback",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    scale = parser.add_argument_group("scale-out on Ray Serve (needs: pip install 'cartosplit[ray]')")
    scale.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="where the graphs run: local = onnxruntime in this process (default); ray = a Ray Serve "
        "deployment (replicas, autoscaling) behind this server, which keeps checks, TLS, auth and health",
    )
    scale.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this Ray cluster ('auto', HOST:PORT or ray://HOST:10001); default: start a local Ray "
        "and shut it down on exit",
    )
    scale.add_argument(
        "--ray-config",
        metavar="FILE",
        help="YAML or JSON: num_replicas, autoscaling_config, max_batch_size, batch_wait_timeout_s, num_cpus, "
        "ray_actor_options, ... (docs/scaling.md)",
    )
    scale.add_argument(
        "--ray-app",
        metavar="NAME",
        help="use this already-deployed Serve application (e.g. from a KubeRay RayService) instead of "
        "deploying one; it must serve the same bundle",
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        bundle=args.bundle,
        host=args.host,
        port=args.port,
        fmt=args.fmt,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_message_bytes=int(args.max_message_mb * 1024 * 1024),
        threads=args.threads,
        workers=args.workers,
        metrics_port=args.metrics_port,
        grace_s=args.grace_s,
        security=security_from_args(args),
        backend=args.backend,
        ray_address=args.ray_address,
        ray_config=args.ray_config,
        ray_app=args.ray_app,
    )


def security_from_args(args: argparse.Namespace) -> ServerSecurity | None:
    """--tls-cert/--tls-key/--tls-client-ca/--token-file as a ServerSecurity; None when none is given."""
    files = {
        "cert_file": args.tls_cert,
        "key_file": args.tls_key,
        "client_ca_file": args.tls_client_ca,
        "token_file": args.token_file,
    }
    return None if all(f is None for f in files.values()) else ServerSecurity(**files)


def parse_alpha(text: str) -> float:
    """A confidence threshold: a number in [0, 1], or 'inf' (never exit here)."""
    value = float(text)
    if not (0.0 <= value <= 1.0 or math.isinf(value)):
        raise argparse.ArgumentTypeError(f"threshold must be in [0, 1] or inf, got {text}")
    return value
