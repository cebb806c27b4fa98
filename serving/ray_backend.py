"""Scale-out of a tier on Ray Serve: the grpcio front keeps the protocol, the slices run in Ray replicas.

The front (``cartosplit.serving.lifecycle.TierServer``) still owns the wire contract, TLS, auth, validation, health,
metrics, streaming and its own micro-batching. What changes with ``--backend ray`` is where a closed
micro-batch runs: instead of onnxruntime in the front's process, it goes through a Serve deployment handle to
a replica of the tier's deployment (onnxruntime inside, every graph of the tier). A replica batches again
with ``@serve.batch``: micro-batches (from one front or from several) that share a graph and a sequence
length are concatenated into one model run. So that they share a length, the front pads each micro-batch
to a bucket (16, 32, 48, ... up to the bundle's max_length); the attention mask keeps the padding out of
the answer, and the front's batcher trims hidden-state outputs back to each sample's length.

Ray is an optional extra (``pip install 'cartosplit[ray]'``): nothing else in the kit imports it, and this
module imports it only when a backend is opened or an application is built.

Ray's own protocol between the front and the replicas is neither encrypted nor authenticated (Ray's
documentation: run Ray on a trusted network only). The front's TLS and tokens protect the clients' link.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cartosplit.device_runtime.buckets import bucket_for, pad_to, seq_buckets
from cartosplit.device_runtime.bundle import Bundle, load_bundle
from cartosplit.serving.checks import RequestError
from cartosplit.serving.graphs import tier_graphs
from cartosplit.serving.logs import log_event
from cartosplit.serving.ray_replica import bind_application, import_ray
from cartosplit.serving.ray_settings import RaySettings

APP_PREFIX = "cartosplit"
LOCAL_START_ATTEMPTS = 3
RAY_SESSION_LOGS = Path("/tmp/ray/session_latest/logs")  # Ray's default temp dir


def default_app_name(tier: str, bundle_id: str) -> str:
    return f"{APP_PREFIX}-{tier}-{bundle_id[:12]}"


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for ``serve run`` and KubeRay
    (``import_path: cartosplit.serving.ray_backend:build_app``).

    ``args``: ``bundle`` (a folder every Ray node sees at that path), ``tier`` (cloud or edge, default cloud),
    ``format`` (default onnx-int8), and any :class:`RaySettings` key. The fronts then attach with ``--ray-app``.
    """
    args = dict(args)
    if "bundle" not in args:
        raise ValueError("build_app needs args.bundle: the bundle folder, at the same path on every Ray node")
    bundle = load_bundle(args.pop("bundle"))
    tier, fmt = args.pop("tier", "cloud"), args.pop("format", "onnx-int8")
    settings = RaySettings.from_mapping(args, "build_app args")
    return bind_application(bundle, tier, fmt, list(tier_graphs(bundle, tier)), settings, None)


# ---------------------------------------------------------------------------------------------- the front


class RayGraphSession:
    """A graph as the front's batcher sees it: padded micro-batches out to the deployment, outputs back."""

    def __init__(
        self,
        handle: Any,
        graph: str,
        input_names: list[str],
        buckets: list[int],
        timeout_s: float,
        max_in_flight: int,
    ) -> None:
        self.handle, self.graph, self.input_names = handle, graph, input_names
        self.buckets, self.timeout_s, self.max_in_flight = buckets, timeout_s, max_in_flight

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        import ray.exceptions
        import ray.serve.exceptions

        length = bucket_for(inputs[0].shape[1], self.buckets)
        feed = {name: pad_to(np.ascontiguousarray(x), length) for name, x in zip(self.input_names, inputs, strict=True)}
        try:
            return self.handle.remote(self.graph, feed).result(timeout_s=self.timeout_s)
        except ray.exceptions.RayTaskError:
            raise  # the replica's own error: INTERNAL with a logged traceback, like a local model failure
        except TimeoutError:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE, f"the Ray deployment did not answer within {self.timeout_s:g} s"
            ) from None
        except (ray.exceptions.RayError, ray.serve.exceptions.RayServeException) as exc:  # replicas gone, overload
            message = f"the Ray deployment failed: {type(exc).__name__}"
            raise RequestError(grpc.StatusCode.UNAVAILABLE, message) from None


class RayBackend:
    """``--backend ray``: the tier's graphs in a Ray Serve deployment (deployed here, or attached to)."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        config_file: str | Path | None = None,
        attach_app: str | None = None,
        front_max_batch: int = 1,
    ) -> None:
        self.address, self.attach_app, self.front_max_batch = address, attach_app, front_max_batch
        self.settings = RaySettings.from_file(config_file) if config_file is not None else RaySettings()
        if attach_app is None:
            self._check_batch_fits(self.settings.max_batch_size, "--ray-config max_batch_size")
        import_ray()  # fail now, with the install hint, not after the bundle has loaded
        self.app_name: str | None = None
        self._started_ray = False  # we started a local Ray: shut Serve and Ray down on close
        self._connected = False  # we joined a cluster: delete our application, disconnect, leave the rest
        self._deployed = False
        self._closed = False

    def open_graphs(
        self, bundle: Bundle, graphs: dict[str, str], fmt: str, threads: int | None, tier: str
    ) -> dict[str, RayGraphSession]:
        ray, serve = import_ray()
        try:
            self._connect(ray)
            if self.attach_app is not None:
                self.app_name = self.attach_app
                handle = self._attach(serve, bundle, graphs, fmt)
            else:
                self.app_name = self.settings.app_name or default_app_name(tier, bundle.bundle_id)
                handle = self._deploy(serve, bundle, tier, graphs, fmt, threads)
        except Exception:
            self.close()
            raise
        buckets = seq_buckets(bundle.manifest.model.max_length, self.settings.seq_buckets)
        in_flight = self.settings.max_in_flight or 2 * self.settings.upper_replicas()
        return {
            graph: RayGraphSession(
                handle,
                graph,
                list(bundle.manifest.graphs[graph].inputs),
                buckets,
                self.settings.call_timeout_s,
                in_flight,
            )
            for graph in graphs
        }

    def _check_batch_fits(self, replica_batch: int, source: str) -> None:
        # a front micro-batch larger than a replica's batch would be refused by @serve.batch on every full batch
        if self.front_max_batch > replica_batch:
            raise ValueError(
                f"--max-batch {self.front_max_batch} is larger than the replicas' batch ({source} {replica_batch}): "
                "lower --max-batch or raise max_batch_size"
            )

    def _connect(self, ray: Any) -> None:
        quiet = {"logging_level": logging.WARNING, "log_to_driver": False, "namespace": APP_PREFIX}
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the front's stderr stays JSON events
        if ray.is_initialized():  # the hosting process (a test, a notebook) already joined one: use it as is
            mode = "existing"
        elif self.address is not None:
            try:
                ray.init(address=self.address, **quiet)
            except Exception as exc:
                raise OSError(f"cannot join the Ray cluster at {self.address}: {type(exc).__name__}: {exc}") from None
            self._connected, mode = True, "joined"
        else:
            self._start_local(ray, quiet)
            self._started_ray, mode = True, "started"
        log_event(logging.INFO, "ray_connected", mode=mode, address=self.address or "local")

    def _start_local(self, ray: Any, quiet: dict[str, Any]) -> None:
        # Ray waits a fixed 30 s for its raylet to register; a starved machine (a 2-core CI box right after a
        # long suite) can miss that once and make it the next time, so a failed start is retried from scratch.
        failures: list[str] = []
        for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
            try:
                ray.init(
                    num_cpus=self.settings.local_num_cpus or os.cpu_count(),
                    include_dashboard=False,
                    object_store_memory=self.settings.object_store_mib * 1024 * 1024,
                    **quiet,
                )
                return
            except Exception as exc:  # e.g. "the current node timed out during startup"
                failures.append(f"attempt {attempt}: {type(exc).__name__}: {exc}")
                log_event(logging.WARNING, "ray_start_failed", attempt=attempt, error=f"{type(exc).__name__}: {exc}")
                ray.shutdown()  # kills what this attempt started, so the next one begins clean
        raise OSError(f"cannot start a local Ray ({'; '.join(failures)}){_raylet_log_tail()}")

    def _deploy(
        self, serve: Any, bundle: Bundle, tier: str, graphs: dict[str, str], fmt: str, threads: int | None
    ) -> Any:
        serve.start(proxy_location="Disabled")  # no HTTP or gRPC proxies: the front is the only way in
        app = bind_application(bundle, tier, fmt, list(graphs), self.settings, threads)
        handle = serve.run(app, name=self.app_name, route_prefix=None)  # returns once the replicas are up
        self._deployed = True
        log_event(
            logging.INFO,
            "ray_deployed",
            app=self.app_name,
            graphs=sorted(graphs),
            settings={k: v for k, v in asdict(self.settings).items() if v is not None},
        )
        return handle

    def _attach(self, serve: Any, bundle: Bundle, graphs: dict[str, str], fmt: str) -> Any:
        # a front started beside a RayService may come up before the application: wait for it if told to
        deadline = time.monotonic() + self.settings.attach_timeout_s
        while True:
            try:
                handle = serve.get_app_handle(self.app_name)
                served = handle.describe.remote().result(timeout_s=self.settings.call_timeout_s)
                break
            except Exception as exc:
                if time.monotonic() >= deadline:
                    reason = f"{type(exc).__name__}: {exc}"
                    raise ValueError(f"cannot use the Serve application {self.app_name!r}: {reason}") from None
                time.sleep(2.0)
        if served.get("bundle_id") != bundle.bundle_id:
            raise ValueError(
                f"the Serve application {self.app_name!r} serves bundle {str(served.get('bundle_id'))[:12]!r}, "
                f"this front serves {bundle.bundle_id[:12]!r}"
            )
        missing = sorted(set(graphs) - set(served.get("graphs", ())))
        if missing or served.get("format") != fmt:
            raise ValueError(
                f"the Serve application {self.app_name!r} runs {served.get('graphs')} as {served.get('format')}; "
                f"this front needs {sorted(graphs)} as {fmt}"
            )
        self._check_batch_fits(int(served.get("max_batch_size", 0)), f"application {self.app_name!r} max_batch_size")
        log_event(logging.INFO, "ray_attached", app=self.app_name, graphs=sorted(graphs))
        return handle

    def close(self) -> None:
        """Our application goes; Serve and Ray too when we started them; a joined cluster keeps running."""
        if self._closed:
            return
        self._closed = True
        try:
            import ray
            from ray import serve
        except ImportError:
            return
        steps = []
        if self._started_ray:
            steps = [("serve_shutdown", serve.shutdown), ("ray_shutdown", ray.shutdown)]
        else:
            if self._deployed and self.app_name is not None:
                steps.append(("serve_delete", lambda: serve.delete(self.app_name)))
            if self._connected:
                steps.append(("ray_disconnect", ray.shutdown))
        for step, action in steps:
            try:
                action()
            except Exception as exc:  # shutting down: say what did not go, carry on with the rest
                log_event(logging.WARNING, "ray_shutdown_step_failed", step=step, error=f"{type(exc).__name__}")
        if steps:
            log_event(logging.INFO, "ray_closed", app=self.app_name, steps=[s for s, _ in steps])


def _raylet_log_tail(lines: int = 20) -> str:
    """The end of the last local Ray's raylet log, so a failed start says why the raylet did not come up."""
    for name in ("raylet.err", "raylet.out"):
        path = RAY_SESSION_LOGS / name
        try:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        if any(line.strip() for line in tail):
            return f"\n--- last lines of {path} ---\n" + "\n".join(tail)
    return ""


def ray_is_installed() -> bool:
    try:
        import_ray()
    except ValueError:
        return False
    return True
