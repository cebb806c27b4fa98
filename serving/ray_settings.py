"""What ``--ray-config`` (a YAML or JSON file) and ``build_app``'s args may set for a tier on Ray Serve."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'cartosplit[ray]'"


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
