"""The deployment files parse, and what they run is what the kit offers.

No image is built and no cluster is reached: every Kubernetes manifest loads as YAML with the expected kinds
and API versions; ports, probes and Services line up; each container's arguments parse with the real
``cartosplit`` parser; the RayService's Serve config validates against Ray Serve's own schema and names an
application builder that exists; the Dockerfiles start real subcommands from a pinned, non-root image.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # PyYAML: the dev and ray extras bring it
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

from cartosplit.cli import build_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
API_VERSIONS = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "ConfigMap": "v1",
    "RayService": "ray.io/v1",
}


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def cli_args(args: list[str]):
    """Parse like `cartosplit ARGS` would (parse only: nothing starts)."""
    return build_parser(args[0]).parse_args(args)


def probe_port(probe: dict) -> int:
    return probe["grpc"]["port"]


def check_server_container(container: dict, subcommand: str, volume_mounts: dict[str, str]):
    """The container runs `cartosplit <subcommand>` with flags the CLI accepts and probes its gRPC port."""
    args = container["args"]
    assert args[0] == subcommand
    parsed = cli_args(args)
    grpc_ports = [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"]
    assert grpc_ports == [parsed.port]
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe_port(container[name]) == parsed.port, name  # grpc.health.v1, which the servers serve
    metrics = [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"]
    assert metrics == [parsed.metrics_port]
    assert parsed.host == "0.0.0.0"  # a pod must listen beyond loopback
    mounted = [path for name, path in volume_mounts.items() if parsed.bundle.startswith(path + "/")]
    assert mounted, f"--bundle {parsed.bundle} is on no mounted volume"
    return parsed


def mounts_of(container: dict) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}


def test_every_manifest_has_known_kinds_and_api_versions():
    files = sorted(K8S.glob("*.yaml"))
    assert {f.name for f in files} >= {"cloud.yaml", "edge.yaml", "rayservice-cloud.yaml"}
    for path in files:
        for doc in documents(path.name):
            assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], (path.name, doc["kind"])
            assert doc["metadata"]["name"].startswith("cartosplit-")


@pytest.mark.parametrize(("name", "tier", "port"), [("cloud.yaml", "cloud", 50052), ("edge.yaml", "edge", 50051)])
def test_plain_tier_deployment_service_and_autoscaler_line_up(name, tier, port):
    docs = documents(name)
    (deployment,) = by_kind(docs, "Deployment")
    (service,) = by_kind(docs, "Service")
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    parsed = check_server_container(container, f"serve-{tier}", mounts_of(container))
    assert parsed.port == port and parsed.backend == "local"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # the pod may take as long to stop as the server's grace for in-flight requests, and more
    assert pod["spec"]["terminationGracePeriodSeconds"] > parsed.grace_s
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert all(m["readOnly"] for m in container["volumeMounts"])
    assert volumes["bundles"]["persistentVolumeClaim"]["readOnly"] is True

    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert (grpc_port["port"], named_ports[grpc_port["targetPort"]]) == (port, port)

    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"], target["apiVersion"]) == (
        "Deployment",
        deployment["metadata"]["name"],
        "apps/v1",
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    if tier == "edge":  # the edge forwards to the cloud's Service
        (cloud_service,) = by_kind(documents("cloud.yaml"), "Service")
        assert parsed.cloud == f"{cloud_service['metadata']['name']}:50052"


def test_rayservice_runs_the_kit_builder_and_a_front_that_attaches_to_it():
    docs = documents("rayservice-cloud.yaml")
    (service,) = by_kind(docs, "RayService")
    (config_map,) = by_kind(docs, "ConfigMap")
    (front_service,) = by_kind(docs, "Service")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "cartosplit.serving.ray_backend:build_app"
    assert app["route_prefix"] is None  # not an HTTP route: only the front calls it

    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == _pinned_ray_version()
    head = cluster["headGroupSpec"]["template"]
    containers = {c["name"]: c for c in head["spec"]["containers"]}
    front = containers["cloud-front"]
    parsed = check_server_container(front, "serve-cloud", mounts_of(front))
    assert (parsed.backend, parsed.ray_app, parsed.ray_address) == ("ray", app["name"], "auto")
    assert parsed.bundle == app["args"]["bundle"] and parsed.fmt == app["args"]["format"]
    # the front joins the head's raylet: same /tmp/ray; the bundle at the same path on every Ray pod
    assert mounts_of(front)["ray-tmp"] == mounts_of(containers["ray-head"])["ray-tmp"] == "/tmp/ray"
    for group in cluster["workerGroupSpecs"]:
        (worker,) = group["template"]["spec"]["containers"]
        assert mounts_of(worker)["bundles"] == mounts_of(front)["bundles"]
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # the front's --ray-config comes from the ConfigMap and is settings the backend accepts
    config_mount = mounts_of(front)["front-config"]
    assert Path(parsed.ray_config).parent == Path(config_mount)
    from cartosplit.serving.ray_settings import RaySettings

    front_settings = RaySettings.from_mapping(yaml.safe_load(config_map["data"][Path(parsed.ray_config).name]))
    assert front_settings.attach_timeout_s > 0  # the front may start before the application is up
    # the token the front gives Ray is the cluster's
    env = {e["name"]: e for e in front["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == cluster["authOptions"]["mode"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == cluster["authOptions"]["secretName"]
    assert front_service["spec"]["selector"].items() <= head["metadata"]["labels"].items()


def test_rayservice_serve_config_is_valid_for_ray_serve(bundle):
    pytest.importorskip("ray")
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    (service,) = by_kind(documents("rayservice-cloud.yaml"), "RayService")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = schema.applications
    module, function = app.import_path.split(":")
    builder = getattr(__import__(module, fromlist=[function]), function)
    # the builder makes the application from these args (with the test bundle standing in for /bundles/sst2)
    application = call_user_app_builder_with_args_if_necessary(builder, {**app.args, "bundle": str(bundle)})
    deployment_names = {d.name for d in app.deployments}
    assert deployment_names == {application._bound_deployment.name}  # the override names the real deployment


def _pinned_ray_version() -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (ray_pin,) = [r for r in extras["ray"] if r.startswith("ray")]
    return ray_pin.split("==")[1]


def test_the_ray_extra_pins_ray_and_keeps_protobuf_below_8():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.fullmatch(r"ray\[serve\]==\d+\.\d+\.\d+", r) for r in extras["ray"])
    assert any(r.startswith("protobuf") and "<8" in r for r in extras["ray"])


# ---------------------------------------------------------------------------------------------- Dockerfiles


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (DOCKER / name).read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def instruction(parsed: list[tuple[str, str]], name: str) -> list[str]:
    return [args for key, args in parsed if key == name]


@pytest.mark.parametrize(
    ("name", "subcommand", "extras"),
    [
        ("Dockerfile.cloud", "serve-cloud", {"server"}),
        ("Dockerfile.edge", "serve-edge", {"server"}),
        ("Dockerfile.cloud-ray", "serve-cloud", {"server", "ray"}),
    ],
)
def test_dockerfiles_start_real_subcommands_from_a_pinned_non_root_image(name, subcommand, extras):
    parsed = dockerfile(name)
    (base,) = instruction(parsed, "FROM")
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base  # a patch release
    (user,) = instruction(parsed, "USER")
    assert user.split(":")[0] not in ("root", "0")
    (entrypoint,) = instruction(parsed, "ENTRYPOINT")
    (cmd,) = instruction(parsed, "CMD")
    assert json.loads(entrypoint) == ["cartosplit"]
    args = json.loads(cmd)
    assert args[0] == subcommand
    real = set(build_parser()._subparsers._group_actions[0].choices)  # the CLI's subcommands
    assert args[0] in real
    options = cli_args(args)
    assert options.bundle == "/bundle" and options.host == "0.0.0.0"
    assert str(options.port) in instruction(parsed, "EXPOSE")[0].split()
    # what is installed: the named extras exist, and none of them pulls torch
    known = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = [a for a in instruction(parsed, "RUN") if "pip install" in a]
    (install,) = installs
    requested = set(re.search(r'"\.\[([\w,-]+)\]"', install).group(1).split(","))
    assert requested == extras and requested <= set(known)
    assert not any(r.startswith("torch") for extra in requested for r in known[extra])
    # every COPY source is in the repository
    for copy in instruction(parsed, "COPY"):
        *sources, _ = shlex.split(copy)
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY {source} is not in the repository"


def test_verify_aarch64_help_prints_its_header_and_options_only():
    done = subprocess.run(["bash", str(ROOT / "scripts" / "verify-aarch64"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "set -euo pipefail" not in done.stdout  # the header's sed range once ran one line too far
    assert done.stdout.startswith("Verify the device tier on aarch64") and "--bundle DIR" in done.stdout
