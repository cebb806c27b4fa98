"""Scale-out of a tier on Ray Serve: the grpcio front keeps the protocol, the slices run in Ray replicas.

The front (``cartosplit.cloud_server.tier.TierServer``) still owns the wire contract, TLS, auth, validation, health,
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

import asyncio
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cartosplit.cloud_server.tier import RequestError, log_event
from cartosplit.device_runtime.bundle import Bundle, load_bundle
from cartosplit.device_runtime.onnx_backend import OnnxSession

INSTALL_HINT = "pip install 'cartosplit[ray]'"
APP_PREFIX = "cartosplit"
BUCKET_STEP = 16
LOCAL_START_ATTEMPTS = 3
RAY_SESSION_LOGS = Path("/tmp/ray/session_latest/logs")  # Ray's default temp dir


# ----------------------------------------------------------------------------------------------- settings


@dataclass
class RaySettings:
    """What ``--ray-config`` may set (YAML or JSON, one mapping); every key is optional."""

    num_replicas: int | str = 1  # replicas of the tier's deployment, or "auto" (with autoscaling_config)
    autoscaling_config: dict | None = None  # Serve's: min_replicas, max_replicas, target_ongoing_requests, ...
    max_ongoing_requests: int = 8  # micro-batches one replica accepts at once
    max_batch_size: int = 32  # samples per replica model run, summed over the micro-batches it joins
    batch_wait_timeout_s: float = 0.002  # how long a replica's batch waits for more micro-batches
    num_cpus: float = 1.0  # Ray CPUs each replica reserves
    ray_actor_options: dict = field(default_factory=dict)  # anything else for the replica actors (wins)
    intra_op_threads: int | None = 1  # onnxruntime threads per replica (None: the front's --threads)
    seq_buckets: list[int] | None = None  # sequence-length buckets; default 16, 32, 48, ... max_length
    max_in_flight: int | None = None  # micro-batches per graph the front has out at once; default 2/replica
    call_timeout_s: float = 30.0  # a micro-batch not answered by then fails with UNAVAILABLE
    local_num_cpus: int | None = None  # a local Ray (no --ray-address): CPUs it schedules; default all
    object_store_mib: int = 128  # a local Ray's object store; the arrays passed here are small
    app_name: str | None = None  # the Serve application; default cartosplit-<tier>-<bundle id[:12]>
    attach_timeout_s: float = 0.0  # --ray-app: keep trying this long for the application to come up

    def __post_init__(self) -> None:
        auto = self.num_replicas == "auto"
        if not auto and (not isinstance(self.num_replicas, int) or self.num_replicas < 1):
            raise ValueError(f"num_replicas must be an integer >= 1 or 'auto', got {self.num_replicas!r}")
        if self.autoscaling_config is not None and not isinstance(self.autoscaling_config, dict):
            raise ValueError("autoscaling_config must be a mapping (Serve's autoscaling options)")
        if self.autoscaling_config is not None and not auto and self.num_replicas != 1:
            raise ValueError("give either a fixed num_replicas or an autoscaling_config, not both")
        positive = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_batch_size": self.max_batch_size,
            "call_timeout_s": self.call_timeout_s,
            "object_store_mib": self.object_store_mib,
        }
        for name, value in positive.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("batch_wait_timeout_s", "attach_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not isinstance(self.num_cpus, (int, float)) or self.num_cpus < 0:
            raise ValueError(f"num_cpus must be >= 0, got {self.num_cpus!r}")
        if not isinstance(self.ray_actor_options, dict):
            raise ValueError("ray_actor_options must be a mapping")
        for name in ("intra_op_threads", "max_in_flight", "local_num_cpus"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.seq_buckets is not None and (
            not isinstance(self.seq_buckets, list)
            or not self.seq_buckets
            or not all(isinstance(b, int) and b >= 1 for b in self.seq_buckets)
        ):
            raise ValueError(f"seq_buckets must be a non-empty list of positive integers, got {self.seq_buckets!r}")

    @classmethod
    def from_mapping(cls, values: object, source: str = "the Ray settings") -> RaySettings:
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> RaySettings:
        """Read a YAML (.yaml/.yml) or JSON file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read the Ray config {path}: {exc.strerror}") from None
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"reading {path} needs PyYAML ({INSTALL_HINT} brings it)") from None
            try:
                values = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(f"{path} is not valid YAML: {exc}") from None
        else:
            try:
                values = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}); name YAML files .yaml or .yml") from None
        return cls.from_mapping(values if values is not None else {}, str(path))

    def upper_replicas(self) -> int:
        """The most replicas this deployment may run (fixed count, or autoscaling's max_replicas)."""
        if self.num_replicas == "auto" or self.autoscaling_config is not None:
            return int((self.autoscaling_config or {}).get("max_replicas", 1))
        return int(self.num_replicas)

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for Serve's ``Deployment.options``."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, **self.ray_actor_options},
        }
        if self.autoscaling_config is not None:
            options.update(num_replicas="auto", autoscaling_config=self.autoscaling_config)
        else:
            options["num_replicas"] = self.num_replicas
        return options


def seq_buckets(max_length: int, buckets: Sequence[int] | None = None) -> list[int]:
    """Sorted sequence-length buckets ending at ``max_length`` (lengths above max_length never pass the front).

    Default: every BUCKET_STEP tokens. Padding costs compute (a 65-token input in a 128 bucket nearly doubles
    the model's work), so steps stay fine; fewer, coarser buckets only help replicas merge more micro-batches.
    """
    if buckets is None:
        chosen = list(range(BUCKET_STEP, max_length, BUCKET_STEP))
    else:
        chosen = [b for b in buckets if b < max_length]
    return [*sorted(set(chosen)), max_length]


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for size in buckets:
        if size >= length:
            return size
    raise ValueError(f"sequence length {length} is above the largest bucket {buckets[-1]}")


def pad_to(values: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad axis 1 (the sequence axis of [B, S] and [B, S, H]) to ``length``."""
    extra = length - values.shape[1]
    if extra == 0:
        return values
    widths = [(0, 0)] * values.ndim
    widths[1] = (0, extra)
    return np.pad(values, widths)


def default_app_name(tier: str, bundle_id: str) -> str:
    return f"{APP_PREFIX}-{tier}-{bundle_id[:12]}"


# ---------------------------------------------------------------------------------------------- the replica


def _import_ray() -> tuple[Any, Any]:
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
        missing = [g for g in graphs if g not in bundle.manifest["graphs"]]
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
    _, serve = _import_ray()

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


def tier_graphs(bundle: Bundle, tier: str) -> dict[str, str]:
    """``{graph: kind}`` of a tier, as its servicer opens them."""
    if tier == "cloud":
        from cartosplit.cloud_server.server import cloud_graphs

        return {g: "tokens" if depth == 0 else "hidden" for depth, g in cloud_graphs(bundle).items()}
    if tier == "edge":
        return {"edge": "hidden"}
    raise ValueError(f"tier must be 'cloud' or 'edge', got {tier!r}")


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


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for ``serve run`` and KubeRay
    (``import_path: cartosplit.cloud_server.ray_backend:build_app``).

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
        _import_ray()  # fail now, with the install hint, not after the bundle has loaded
        self.app_name: str | None = None
        self._started_ray = False  # we started a local Ray: shut Serve and Ray down on close
        self._connected = False  # we joined a cluster: delete our application, disconnect, leave the rest
        self._deployed = False
        self._closed = False

    def open_graphs(
        self, bundle: Bundle, graphs: dict[str, str], fmt: str, threads: int | None, tier: str
    ) -> dict[str, RayGraphSession]:
        ray, serve = _import_ray()
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
        buckets = seq_buckets(int(bundle.manifest["model"]["max_length"]), self.settings.seq_buckets)
        in_flight = self.settings.max_in_flight or 2 * self.settings.upper_replicas()
        return {
            graph: RayGraphSession(
                handle,
                graph,
                list(bundle.manifest["graphs"][graph]["inputs"]),
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
        _import_ray()
    except ValueError:
        return False
    return True
