"""A tier server's life: grpc with health and reflection, the metrics endpoint, start, drain, stop, signals."""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from cartosplit.protos.security import ServerSecurity
from cartosplit.serving.config import ServerConfig, format_address, grpc_options
from cartosplit.serving.logs import log_event
from cartosplit.serving.metrics import RefusalCounter
from cartosplit.serving.servicer import TierServicer


class TierServer:
    """A grpc server for one tier with health, reflection and (optionally) a Prometheus endpoint.

    The port is bound on construction, so ``.port`` is known before :meth:`start`.
    """

    def __init__(
        self,
        config: ServerConfig,
        servicer: TierServicer,
        add_to_server: Callable[[object, grpc.Server], None],
        service_name: str,
    ) -> None:
        self.config, self.servicer, self.service_name = config, servicer, service_name
        self.metrics = servicer.metrics
        self.health = health.HealthServicer()
        # so_reuseport off: a second server on a taken port must fail, not silently share it
        options = [*grpc_options(config.max_message_bytes), ("grpc.so_reuseport", 0)]
        self.security = config.security or ServerSecurity()
        try:  # the files are read now: a missing or wrong one stops the server before it listens
            credentials = self.security.server_credentials()
            prefix = f"/{service_name}/"

            def count_refusal(method: str) -> None:  # a bad token: counted here, before any handler runs
                if method.startswith(prefix):
                    self.metrics.refused(grpc.StatusCode.UNAUTHENTICATED)

            # the token check first (refused calls stop there), then the count of what grpcio refuses
            interceptors = [*self.security.interceptors(count_refusal), RefusalCounter(self.metrics, service_name)]
        except ValueError:
            servicer.close()
            raise
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(config.workers, thread_name_prefix=f"{servicer.tier_name}-grpc"),
            options=options,
            interceptors=interceptors,
        )
        add_to_server(servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        address = format_address(config.host, config.port)
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            servicer.close()
            hint = " (or the TLS certificate and key do not match)" if credentials is not None else ""
            raise OSError(f"cannot listen on {address}{hint}: {exc}") from None
        self.host = config.host
        self.metrics_port: int | None = None
        self._metrics_http = None
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def start(self) -> TierServer:
        self._server.start()
        if self.config.metrics_port is not None:
            httpd, _ = start_http_server(self.config.metrics_port, addr=self.host, registry=self.metrics.registry)
            self._metrics_http, self.metrics_port = httpd, httpd.server_port
        for name in ("", self.service_name):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log_event(
            logging.INFO,
            "started",
            tier=self.servicer.tier_name,
            address=self.address,
            bundle_id=self.servicer.bundle.bundle_id[:12],
            format=self.config.fmt,
            backend=self.config.backend,
            metrics_port=self.metrics_port,
            security=self.security.mode,  # the mode only, never a secret
        )
        if self.security.token_file is not None and not self.security.tls:
            log_event(
                logging.WARNING,
                "token_without_tls",
                tier=self.servicer.tier_name,
                address=self.address,
                detail="the bearer token travels in plaintext; allowed on loopback only, use --tls-cert/--tls-key",
            )
        return self

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight requests finish (up to ``grace`` s), then stop the models."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        grace = self.config.grace_s if grace is None else grace
        log_event(logging.INFO, "stopping", tier=self.servicer.tier_name, grace_s=grace)
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self.servicer.close()  # after the grpc server: in-flight requests still need their batchers
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log_event(logging.INFO, "stopped", tier=self.servicer.tier_name)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (True) or ``timeout`` passed (False)."""
        return self._server.wait_for_termination(timeout)

    def __enter__(self) -> TierServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def release_large_buffers_to_the_os() -> None:
    """Serve multi-MiB allocations (near-limit messages) with mmap, so freeing them returns the memory.

    glibc otherwise keeps freed 16 MiB request buffers in its per-thread heaps: measured under fuzzing,
    +184 MiB (cloud) and +113 MiB (edge) of RSS that never went back (benchmarks/results/README.md).
    Not glibc: nothing to tune.
    """
    try:
        import ctypes

        m_mmap_threshold = -3  # from malloc.h
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):
        pass


def run_until_signal(server: TierServer, banner: str) -> int:
    """Start, print ``banner`` once ready, serve until SIGTERM/SIGINT, then stop gracefully."""
    release_large_buffers_to_the_os()
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log_event(logging.INFO, "signal", signal=signal.Signals(signum).name)
        stop_requested.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers only work there
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        print(banner, flush=True)
        while not stop_requested.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
