"""The device tier on aarch64 (emulated) against x86: same bundle, same inputs, outputs compared.

Driven by ``scripts/verify-aarch64``, which builds the arm64 Debian root, installs ``cartosplit[device]``
into it from PyPI's aarch64 wheels and mounts the bundle at /mnt/bundle and the work folder at /mnt/work.
Subcommands:

  outputs  (torch-free; runs in the arm64 root and on the host) every device format's graphs on fixed
           inputs, batch 1 as the runtime runs them, plus DeviceRuntime.predict through edge/cloud servers;
           writes <out>.npz (tensors) and <out>.json (environment, predictions)
  sizes    (torch-free) installed size of every distribution, and of what ``cartosplit[device]`` pulled
  verify   (host) inputs, edge + cloud servers on 127.0.0.1, the x86 run, the emulated run, the
           ``serve-device`` service inside the root, installed sizes, the comparison and the report

Any timing taken under qemu-user says nothing about a real Pi and is labelled emulated wherever it appears.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from cartosplit.serving.process import ServerProcess, start_servers, stop_servers

REPO = Path(__file__).resolve().parents[1]
# fallback inputs when the GLUE SST-2 dev file is not at hand (fixed, so every run compares the same thing)
BUILTIN_SENTENCES = [
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "the acting , costumes , music , cinematography and sound are all astounding .",
    "it 's slow -- very , very slow .",
    "a sometimes tedious film .",
    "the movie is a disaster from start to finish",
    "a gorgeous , witty , seductive movie .",
    "the plot is nothing but boilerplate clichés from start to finish",
    "this is one of the year 's best films , and a triumph of storytelling",
    "it never fails to engage us .",
    "i did n't care about any of the characters",
    "an utterly charming and hilarious film that reminded me of the best of the old masters",
    "the story is predictable and the jokes fall flat",
    "a warm , funny , engaging film .",
    "too long , too loud and too stupid",
    "visually stunning and emotionally rich",
]
# packages the device extra must never pull (the workstation stack)
HEAVY = ("torch", "transformers", "tensorflow", "tensorflow-cpu", "jax", "jaxlib", "litert-torch", "tf-keras")
KEY_PACKAGES = ("cartosplit", "numpy", "onnxruntime", "ai-edge-litert", "tokenizers", "grpcio", "protobuf")
EMULATED_NOTE = "wall time under qemu-user emulation on an x86 host: NOT a Raspberry Pi timing"
ROOT_PATH = "/opt/cartosplit/venv/bin:/usr/bin:/bin"


# --- inputs -----------------------------------------------------------------------------------------------


def load_inputs(task: str, samples: int, data_dir: str | None = None) -> dict:
    """The first ``samples`` SST-2 dev sentences when the GLUE folder is found, else the built-in sentences."""
    candidates = [data_dir, os.environ.get("CARTOSPLIT_DATA_DIR"), "../shared/data/glue", REPO / "../shared/data/glue"]
    if task == "sst2":
        for folder in filter(None, candidates):
            path = Path(folder) / "SST-2" / "dev.tsv"
            if path.is_file():
                with path.open(encoding="utf-8", newline="") as f:
                    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:samples]
                return {
                    "source": f"GLUE SST-2 dev.tsv, first {len(rows)} sentences ({path.resolve()})",
                    "texts": [r["sentence"].strip() for r in rows],
                    "labels": [int(r["label"]) for r in rows],
                }
    texts = BUILTIN_SENTENCES[:samples]
    return {"source": f"{len(texts)} built-in sentences (benchmarks/aarch64_check.py)", "texts": texts, "labels": None}


# --- what runs on both architectures ------------------------------------------------------------------------


def environment() -> dict:
    """Architecture, OS, Python, libc, the CPU the process sees and every installed package's version."""
    uname = platform.uname()
    cpu: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if not line.strip() and cpu:
                break  # the first processor is enough
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "CPU implementer", "CPU part", "CPU architecture", "Features", "flags"):
                cpu[key.strip()] = value.strip()[:300]
    os_release = {}
    with_os = Path("/etc/os-release")
    if with_os.is_file():
        for line in with_os.read_text().splitlines():
            key, _, value = line.partition("=")
            os_release[key] = value.strip('"')
    packages = {d.metadata["Name"]: d.version for d in metadata.distributions()}
    return {
        "machine": uname.machine,
        "kernel": f"{uname.system} {uname.release}",
        "os": os_release.get("PRETTY_NAME"),
        "python": platform.python_version(),
        "libc": " ".join(platform.libc_ver()),
        "cpu_seen_by_the_process": cpu,
        "packages": dict(sorted(packages.items(), key=lambda kv: kv[0].lower())),
    }


def device_formats(bundle) -> list[str]:
    head = bundle.manifest.graphs["device_head"].formats()
    return [f for f in bundle.manifest.formats if f in head]


def run_device_graphs(bundle, texts: list[str], fmt: str, threads: int | None) -> tuple[dict, float]:
    """device_head + device_tail per input at batch 1, exactly as DeviceRuntime runs them (TFLite: padded to
    the bucket, hidden states cut back to the real tokens). Returns stacked arrays and the wall seconds."""
    from cartosplit.device_runtime.runtime import DeviceRuntime
    from cartosplit.device_runtime.text import encode, pad_batch

    backend = "onnxruntime" if fmt.startswith("onnx") else "litert"
    with DeviceRuntime(bundle, backend=backend, fmt=fmt, threads=threads) as runtime:
        encoded = encode(runtime.tokenizer, texts)
        rows: dict[str, list[np.ndarray]] = {k: [] for k in ("router_logits", "device_logits", "hidden_r", "hidden_d")}
        started = time.perf_counter()
        for pair in encoded:
            router_logits, hidden_r = runtime.graphs.run_head(pad_batch([pair]))
            hidden_d, device_logits = runtime.graphs.run_tail(hidden_r)
            for key, value in zip(rows, (router_logits, device_logits, hidden_r, hidden_d), strict=True):
                rows[key].append(np.asarray(value, dtype=np.float32))
        seconds = time.perf_counter() - started
    out = {
        "router_logits": np.stack(rows["router_logits"]),
        "device_logits": np.stack(rows["device_logits"]),
        "hidden_r": np.concatenate(rows["hidden_r"]),  # [tokens of all inputs, H]
        "hidden_d": np.concatenate(rows["hidden_d"]),
        "token_ids": np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _ in encoded]),
        "lengths": np.array([len(ids) for ids, _ in encoded], dtype=np.int64),
    }
    return out, seconds


def run_predictions(
    bundle, texts: list[str], fmt: str, edge: str | None, cloud: str | None, threads: int | None
) -> list[dict]:
    """DeviceRuntime.predict through the servers, one input at a time as ``cartosplit run`` does."""
    from cartosplit.device_runtime.runtime import DeviceRuntime

    backend = "onnxruntime" if fmt.startswith("onnx") else "litert"
    keep = ("label", "label_id", "probabilities", "tier", "route", "exit_depth", "degraded", "bytes_sent", "errors")
    with DeviceRuntime(bundle, edge=edge, cloud=cloud, backend=backend, fmt=fmt, threads=threads) as runtime:
        return [{k: p.to_dict()[k] for k in keep} for text in texts for p in runtime.predict([text])]


def cmd_outputs(args: argparse.Namespace) -> int:
    from cartosplit.device_runtime.bundle import load_bundle

    inputs = json.loads(Path(args.inputs).read_text(encoding="utf-8"))
    bundle = load_bundle(args.bundle)  # verified (sha256 of every file) once; hashing is slow under emulation
    formats = args.formats or device_formats(bundle)
    arrays: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for fmt in formats:
        print(f"  {platform.machine()}: {fmt} device graphs on {len(inputs['texts'])} inputs", file=sys.stderr)
        out, seconds[fmt] = run_device_graphs(bundle, inputs["texts"], fmt, args.threads)
        arrays.update({f"{fmt}/{k}": v for k, v in out.items()})
    predictions = {}
    if args.edge or args.cloud:
        for fmt in args.predict_formats:
            print(f"  {platform.machine()}: predict with {fmt} via edge {args.edge}", file=sys.stderr)
            predictions[fmt] = run_predictions(bundle, inputs["texts"], fmt, args.edge, args.cloud, args.threads)
    np.savez_compressed(Path(args.out).with_suffix(".npz"), **arrays)
    report = {
        "environment": environment(),
        "bundle_id": bundle.bundle_id,
        "formats": formats,
        "graph_wall_s": seconds,
        "predictions": predictions,
    }
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


# --- installed size -------------------------------------------------------------------------------------


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist: metadata.Distribution, extra: str | None) -> list[str]:
    """Names this distribution requires: unconditional ones, plus those of ``extra``. Other environment
    markers (python_version, platform) are not evaluated: a dependency counts when it is installed."""
    names = []
    for requirement in dist.requires or []:
        spec, _, marker = requirement.partition(";")
        extras = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if extras and (extra is None or _canonical(extra) not in map(_canonical, extras)):
            continue
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
        if match:
            names.append(_canonical(match.group(1)))
    return names


def _dist_bytes(dist: metadata.Distribution) -> int:
    total = 0
    for file in dist.files or []:
        path = Path(dist.locate_file(file))
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def installed_sizes(root: str = "cartosplit", extra: str = "device") -> dict:
    """Bytes on disk of each installed distribution (its RECORD's files), of the closure of
    ``root[extra]`` (what ``pip install 'cartosplit[device]'`` pulled), and of the whole site-packages."""
    import sysconfig

    dists = {_canonical(d.metadata["Name"]): d for d in metadata.distributions()}
    if _canonical(root) not in dists:
        raise SystemExit(f"{root} is not installed in this environment ({sys.prefix})")
    closure, queue = set(), [(_canonical(root), extra)]
    while queue:
        name, wanted_extra = queue.pop()
        if name in closure or name not in dists:
            continue
        closure.add(name)
        queue.extend((dep, None) for dep in _requirements(dists[name], wanted_extra))
    sizes = {name: _dist_bytes(d) for name, d in dists.items()}
    site = Path(sysconfig.get_paths()["purelib"])
    site_bytes = sum(p.stat().st_size for p in site.rglob("*") if p.is_file() and not p.is_symlink())
    rows = sorted(
        ({"name": dists[n].metadata["Name"], "version": dists[n].version, "bytes": sizes[n]} for n in closure),
        key=lambda r: -r["bytes"],
    )
    return {
        "environment": sys.prefix,
        "machine": platform.machine(),
        "extra": f"{root}[{extra}]",
        "closure_bytes": sum(r["bytes"] for r in rows),
        "closure": rows,
        "outside_closure": sorted(f"{dists[n].metadata['Name']} {dists[n].version}" for n in set(dists) - closure),
        "site_packages_bytes": site_bytes,
        "heavy_packages_present": sorted(n for n in HEAVY if _canonical(n) in dists),
    }


def cmd_sizes(args: argparse.Namespace) -> int:
    report = installed_sizes()
    text = json.dumps(report, indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


# --- host side ----------------------------------------------------------------------------------------------


def _in_root(root: str, cpu: str, *argv: str) -> list[str]:
    """The command line that runs ``argv`` inside the root, in a clean environment (no host PIP_*, paths)."""
    env = ["HOME=/root", "LANG=C.UTF-8", f"PATH={ROOT_PATH}", f"QEMU_CPU={cpu}", "PYTHONUNBUFFERED=1"]
    return ["chroot", root, "/usr/bin/env", "-i", *env, *argv]


def _run(argv: list[str], what: str, timeout_s: float) -> float:
    """Run to the end (its output goes straight to our stderr, so slow emulated progress shows); wall seconds."""
    started = time.perf_counter()
    result = subprocess.run(argv, timeout=timeout_s, stdout=sys.stderr, stderr=sys.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed with exit code {result.returncode}")
    return time.perf_counter() - started


def _http(url: str, body: dict | None = None, raw: bytes | None = None, timeout_s: float = 600.0):
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def _device_decisions(router_logits: np.ndarray, device_logits: np.ndarray, policy) -> np.ndarray:
    """What the device does per input (costs.TIER_*: answers itself, to the edge, straight to the cloud), as the
    runtime decides it."""
    from cartosplit.device_runtime.numerics import softmax
    from cartosplit.device_runtime.policy import device_decision

    return device_decision(policy, softmax(router_logits), softmax(device_logits))


def compare_outputs(x86: dict, arm: dict, formats: list[str], policy) -> dict:
    """Per format: max abs diff of every device output, agreement of labels, router argmax and decisions."""
    report = {}
    for fmt in formats:
        a = {k.split("/", 1)[1]: v for k, v in x86.items() if k.startswith(fmt + "/")}
        b = {k.split("/", 1)[1]: v for k, v in arm.items() if k.startswith(fmt + "/")}
        same_tokens = bool(
            np.array_equal(a["token_ids"], b["token_ids"]) and np.array_equal(a["lengths"], b["lengths"])
        )
        diffs = {
            k: float(np.abs(a[k] - b[k]).max()) for k in ("router_logits", "device_logits", "hidden_r", "hidden_d")
        }
        agreement = {
            "device_label": float((a["device_logits"].argmax(1) == b["device_logits"].argmax(1)).mean()),
            "router_argmax": float((a["router_logits"].argmax(1) == b["router_logits"].argmax(1)).mean()),
            "device_decision": float(
                (
                    _device_decisions(a["router_logits"], a["device_logits"], policy)
                    == _device_decisions(b["router_logits"], b["device_logits"], policy)
                ).mean()
            ),
        }
        report[fmt] = {
            "inputs": len(a["lengths"]),
            "token_ids_identical": same_tokens,
            "max_abs_diff": diffs,
            "agreement": agreement,
        }
        fp32 = fmt.replace("int8", "fp32")
        if fmt.endswith("int8") and fp32 in formats:
            # int8's own error: against the fp32 graphs of the same format on the same architecture (the
            # smaller of the two architectures'), the yardstick for the cross-architecture difference
            report[fmt]["int8_vs_fp32_same_arch"] = {
                k: min(float(np.abs(side[f"{fmt}/{k}"] - side[f"{fp32}/{k}"]).max()) for side in (x86, arm))
                for k in diffs
            }
    return report


def compare_predictions(x86: list[dict], arm: list[dict]) -> dict:
    same = lambda key: float(np.mean([p[key] == q[key] for p, q in zip(x86, arm, strict=True)]))  # noqa: E731
    probs = max(
        float(np.abs(np.asarray(p["probabilities"]) - np.asarray(q["probabilities"])).max())
        for p, q in zip(x86, arm, strict=True)
    )
    routes: dict[str, int] = {}
    for p in arm:
        routes[p["route"]] = routes.get(p["route"], 0) + 1
    return {
        "inputs": len(arm),
        "label_agreement": same("label"),
        "route_agreement": same("route"),
        "tier_agreement": same("tier"),
        "max_abs_diff_probabilities": probs,
        "aarch64_routes": routes,
        "aarch64_degraded": sum(p["degraded"] for p in arm),
        "aarch64_errors": sum(len(p["errors"]) for p in arm),
        "x86_errors": sum(len(p["errors"]) for p in x86),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_service_in_root(args, texts: list[str], edge: str, cloud: str, fmt: str, expected: list[dict]) -> dict:
    """``cartosplit serve-device`` inside the root (as the Pi's unit runs it), called from the host over
    loopback: health, a batch of texts (labels against the x86 predictions), a bad request, SIGTERM."""
    port = _free_port()
    config = (
        f'bundle = "/mnt/bundle"\nbackend = "onnxruntime"\nformat = "{fmt}"\nthreads = {args.threads}\n'
        f'[servers]\nedge = "{edge}"\ncloud = "{cloud}"\ntimeout = 30.0\n'
        f"[listen]\nport = {port}\n[limits]\nmax_texts = {len(texts)}\n"
    )
    (Path(args.work) / "device.toml").write_text(config)
    argv = _in_root(args.root, args.qemu_cpu, "cartosplit", "serve-device", "--config", "/mnt/work/device.toml")
    service = ServerProcess(argv, "serve-device in the root", timeout_s=900, module=None)
    try:
        health_status, health = _http(f"{service.address}/healthz")
        status, reply = _http(f"{service.address}/v1/classify", {"texts": texts})
        bad_status, bad = _http(f"{service.address}/v1/classify", raw=b"{not json")
        after_status, _ = _http(f"{service.address}/v1/classify", {"texts": texts[:1]})
    finally:
        exit_code = service.stop(grace_s=30)  # emulated: a clean exit takes longer than natively
    labels = [p["label"] for p in reply.get("predictions", [])] if status == 200 else []
    agreement = float(np.mean([a == e["label"] for a, e in zip(labels, expected, strict=False)])) if labels else 0.0
    return {
        "config": config,
        "health_status": health_status,
        "health": health,
        "classify_status": status,
        "answers": len(labels),
        "label_agreement_with_x86_predict": agreement,
        "routes": [p["route"] for p in reply.get("predictions", [])] if status == 200 else [],
        "bad_request_status": bad_status,
        "bad_request_error": (bad or {}).get("error"),
        "served_after_bad_request": after_status,
        "exit_code_after_sigterm": exit_code,
    }


def x86_device_extra_sizes(work: Path) -> dict:
    """A fresh x86 venv with only ``cartosplit[device]`` from PyPI (host pip config ignored), measured."""
    venv = work / "x86-device-venv"
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    wheel = next((work / "wheel").glob("cartosplit-*.whl"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    env["PIP_CONFIG_FILE"] = os.devnull  # PyPI only, as a user's machine would install it
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "--only-binary=:all:", f"cartosplit[device] @ {wheel.resolve().as_uri()}"], check=True, env=env
    )
    out = work / "sizes-x86.json"
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "cartosplit.benchmarks.aarch64_check", "sizes", "--out", str(out)],
        check=True,
        cwd="/",  # the installed package, not this checkout
    )
    shutil.rmtree(venv)  # measured; ~300 MB otherwise left behind
    return json.loads(out.read_text())


def _mb(n: int) -> float:
    return round(n / 1e6, 1)


def cmd_verify(args: argparse.Namespace) -> int:
    from cartosplit.device_runtime.bundle import load_bundle

    work, root = Path(args.work), args.root
    load_before = os.getloadavg()[0]  # the host is shared: say how busy it was
    bundle = load_bundle(args.bundle)
    if "onnx-int8" not in bundle.manifest.formats and "onnx-fp32" not in bundle.manifest.formats:
        raise SystemExit("the edge and cloud servers need ONNX graphs; this bundle has none")
    server_format = "onnx-int8" if "onnx-int8" in bundle.manifest.formats else "onnx-fp32"
    formats = device_formats(bundle)
    predict_formats = [f for f in ("onnx-int8", "tflite-int8") if f in formats] or formats[:1]
    inputs = load_inputs(bundle.manifest.model.task, args.samples, args.data_dir)
    (work / "inputs.json").write_text(json.dumps(inputs, indent=1) + "\n")
    print(f"inputs: {inputs['source']}", file=sys.stderr)

    servers = start_servers(args.bundle, server_format, args=["--threads", "1"])
    edge, cloud = servers["edge"], servers["cloud"]
    try:
        print(f"servers on the host: edge {edge.address}, cloud {cloud.address} ({server_format})", file=sys.stderr)
        outputs = [
            "-m",
            "cartosplit.benchmarks.aarch64_check",
            "outputs",
            "--inputs",
            "{work}/inputs.json",
            "--edge",
            edge.address,
            "--cloud",
            cloud.address,
            "--threads",
            str(args.threads),
            "--predict-formats",
            ",".join(predict_formats),
        ]
        x86_argv = [sys.executable, *[a.format(work=work) for a in outputs], "--bundle", args.bundle]
        x86_s = _run([*x86_argv, "--out", str(work / "x86")], "the x86 run", 3600)
        arm_argv = [a.format(work="/mnt/work") for a in outputs]
        arm_cmd = _in_root(
            root, args.qemu_cpu, "python", *arm_argv, "--bundle", "/mnt/bundle", "--out", "/mnt/work/arm64"
        )
        arm_s = _run(arm_cmd, "the emulated aarch64 run", 4 * 3600)
        x86_report = json.loads((work / "x86.json").read_text())
        arm_report = json.loads((work / "arm64.json").read_text())
        service_texts = inputs["texts"][: min(8, len(inputs["texts"]))]
        service = check_service_in_root(
            args,
            service_texts,
            edge.address,
            cloud.address,
            predict_formats[0],
            x86_report["predictions"][predict_formats[0]],
        )
    finally:
        stop_servers(servers)

    subprocess.run(
        _in_root(
            root,
            args.qemu_cpu,
            "python",
            "-m",
            "cartosplit.benchmarks.aarch64_check",
            "sizes",
            "--out",
            "/mnt/work/sizes-arm64.json",
        ),
        check=True,
    )
    sizes = {"aarch64": json.loads((work / "sizes-arm64.json").read_text()), "x86_64": x86_device_extra_sizes(work)}

    with np.load(work / "x86.npz") as a, np.load(work / "arm64.npz") as b:
        x86_arrays, arm_arrays = dict(a), dict(b)
    policy = bundle.manifest.policy
    graphs = compare_outputs(x86_arrays, arm_arrays, formats, policy)
    predictions = {
        fmt: compare_predictions(x86_report["predictions"][fmt], arm_report["predictions"][fmt])
        for fmt in predict_formats
    }
    int8 = bundle.manifest.formats.get("onnx-int8")
    static_int8 = bool(getattr(int8, "batch_independent", False))
    checks = _checks(graphs, predictions, service, sizes, arm_report["environment"], static_int8)
    arm_env = arm_report["environment"]
    report = {
        "bundle": {"path": args.bundle, "id": bundle.bundle_id, "model": bundle.manifest.model.id},
        "inputs": {"source": inputs["source"], "count": len(inputs["texts"])},
        "emulation": {
            "qemu": args.qemu_version,
            "qemu_binary": args.qemu_path,
            "qemu_cpu": args.qemu_cpu,
            "how": "qemu-user through binfmt_misc (flags OPF) in a chroot of a debootstrapped Debian bookworm arm64 "
            "minbase root; 4K pages (a Pi 5 kernel uses 16K)",
            "note": "emulation checks correctness and packaging; it says nothing about speed on a real Pi",
        },
        "aarch64": {k: arm_env[k] for k in ("machine", "os", "python", "libc", "cpu_seen_by_the_process")}
        | {"packages": arm_env["packages"]},
        "x86_64": {k: x86_report["environment"][k] for k in ("machine", "os", "python", "libc")}
        | {"key_packages": {k: x86_report["environment"]["packages"].get(k) for k in KEY_PACKAGES}},
        "servers": {"where": "the x86 host, 127.0.0.1", "format": server_format},
        "device_graphs": graphs,
        "predict_through_servers": predictions,
        "service_in_root": service,
        "installed_size": sizes,
        "emulated_timings_not_device_timings": {
            "note": EMULATED_NOTE,
            "aarch64_graph_wall_s": arm_report["graph_wall_s"],
            "x86_graph_wall_s_native_same_host": x86_report["graph_wall_s"],
            "aarch64_step_wall_s": round(arm_s, 1),
            "x86_step_wall_s": round(x86_s, 1),
            "host_load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        },
        "checks": checks,
        "passed": all(c["held"] for c in checks),
    }
    from cartosplit.benchmarks.report import write_report

    write_report(report, args.out, args.command, _markdown)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0 if report["passed"] else 1


# static ONNX int8 (fixed scales, 7-bit weights: exact integer products on every CPU) differs between hosts only
# where float rounding in its fp32 parts moves a value across one quantization step: a fixed bound on the logits,
# the same whichever x86 host runs the check (dynamic int8's bound was that host's own int8 error, which
# depends on whether it saturates: AVX2 without VNNI does)
STATIC_INT8_CROSS_HOST_ATOL = 0.05


def _checks(
    graphs: dict, predictions: dict, service: dict, sizes: dict, arm_env: dict, static_int8: bool = False
) -> list[dict]:
    from cartosplit.benchmarks.report import check

    out = [check("uname -m inside the root", arm_env["machine"], "== aarch64", arm_env["machine"] == "aarch64")]
    for fmt, g in graphs.items():
        out.append(check(f"{fmt}: token ids identical", g["token_ids_identical"], "true", g["token_ids_identical"]))
        if fmt.endswith("fp32"):  # same float graph, different kernels (NEON vs AVX-512): rounding only
            worst = max(g["max_abs_diff"][k] for k in ("router_logits", "device_logits"))
            out.append(check(f"{fmt}: max abs diff of logits", f"{worst:.2e}", "<= 1e-3", worst <= 1e-3))
            label = min(g["agreement"].values())
            out.append(check(f"{fmt}: label/router/decision agreement", label, "== 1.0", label == 1.0))
        else:
            # int8 (dynamic): activations are quantized at run time from their own min/max, so a float rounding
            # difference can move a value across a quantization step; the difference between architectures must
            # stay below int8's own error against fp32 (the export accepts int8 on label agreement alone)
            own = g.get("int8_vs_fp32_same_arch")
            for k in ("router_logits", "device_logits"):
                cross = g["max_abs_diff"][k]
                if static_int8 and fmt == "onnx-int8":
                    bound = f"<= {STATIC_INT8_CROSS_HOST_ATOL} (static int8: host-independent)"
                    out.append(
                        check(
                            f"{fmt}: max abs diff of {k}", f"{cross:.2e}", bound, cross <= STATIC_INT8_CROSS_HOST_ATOL
                        )
                    )
                elif own is None:
                    out.append(check(f"{fmt}: max abs diff of {k}", f"{cross:.2e}", "(no fp32 to compare)", True))
                else:
                    bound = f"< int8 vs fp32 on one arch ({own[k]:.2e})"
                    out.append(check(f"{fmt}: max abs diff of {k}", f"{cross:.2e}", bound, cross < own[k]))
            label = min(g["agreement"].values())
            out.append(check(f"{fmt}: label/router/decision agreement", label, ">= 0.95", label >= 0.95))
    for fmt, p in predictions.items():
        out.append(
            check(f"predict {fmt}: label agreement", p["label_agreement"], ">= 0.95", p["label_agreement"] >= 0.95)
        )
        out.append(
            check(f"predict {fmt}: tier errors on aarch64", p["aarch64_errors"], "== 0", p["aarch64_errors"] == 0)
        )
    out.append(
        check(
            "serve-device in the root: classify",
            service["classify_status"],
            "== 200",
            service["classify_status"] == 200,
        )
    )
    out.append(
        check("serve-device: bad JSON", service["bad_request_status"], "== 400", service["bad_request_status"] == 400)
    )
    out.append(
        check(
            "serve-device: served after it",
            service["served_after_bad_request"],
            "== 200",
            service["served_after_bad_request"] == 200,
        )
    )
    agreement = service["label_agreement_with_x86_predict"]
    out.append(check("serve-device: labels vs x86 predict", agreement, ">= 0.95", agreement >= 0.95))
    for arch, s in sizes.items():
        heavy = s["heavy_packages_present"]
        out.append(check(f"{arch}: torch/transformers/tensorflow/jax installed", heavy or "none", "none", not heavy))
    return out


def _markdown(report: dict) -> list[str]:
    from cartosplit.benchmarks.report import bounds_table

    em, arm = report["emulation"], report["aarch64"]
    pk = arm["packages"]
    lines = [
        "# Device tier on aarch64 under emulation vs x86",
        "",
        f"Command: `{report['command']}`  ",
        f"Host: {report['machine']}  ",
        f"Emulated: `uname -m` = {arm['machine']}, {arm['os']}, Python {arm['python']}, {arm['libc']}; "
        f"{em['qemu']}, QEMU_CPU={em['qemu_cpu']} ({em['how']}).  ",
        "Inside the root: " + ", ".join(f"{k} {pk.get(k, '-')}" for k in KEY_PACKAGES) + " (PyPI aarch64 wheels).  ",
        f"Bundle: {report['bundle']['path']} (id {report['bundle']['id'][:12]}, {report['bundle']['model']}); "
        f"inputs: {report['inputs']['source']}.  ",
        f"Edge and cloud servers: {report['servers']['where']}, {report['servers']['format']}; the emulated device "
        "reached them over loopback.",
        "",
        f"Result: **{'PASSED' if report['passed'] else 'FAILED'}**.",
        "",
        "## Device graphs, aarch64 vs x86 (same inputs, batch 1, as the runtime runs them)",
        "",
        "| format | token ids | max abs diff router logits | device logits | hidden r | hidden d "
        "| device label | router argmax | device decision |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fmt, g in report["device_graphs"].items():
        d, a = g["max_abs_diff"], g["agreement"]
        lines.append(
            f"| {fmt} | {'identical' if g['token_ids_identical'] else '**differ**'} | {d['router_logits']:.2e} | "
            f"{d['device_logits']:.2e} | {d['hidden_r']:.2e} | {d['hidden_d']:.2e} | {a['device_label']:.3f} | "
            f"{a['router_argmax']:.3f} | {a['device_decision']:.3f} |"
        )
    own = {
        fmt: g["int8_vs_fp32_same_arch"] for fmt, g in report["device_graphs"].items() if "int8_vs_fp32_same_arch" in g
    }
    if own:
        lines += [
            "",
            "For scale, int8 against fp32 of the same format on one architecture (the quantization's own error, "
            "max abs diff): "
            + "; ".join(
                f"{fmt}: router logits {o['router_logits']:.2e}, device logits {o['device_logits']:.2e}, "
                f"hidden r {o['hidden_r']:.2e}, hidden d {o['hidden_d']:.2e}"
                for fmt, o in own.items()
            )
            + ". fp32 graphs differ between the architectures by float rounding only; int8 graphs quantize "
            "activations at run time, so a rounding difference can cross a quantization step, and the difference "
            "between architectures is bounded by int8's own error instead of an absolute number.",
        ]
    lines += [
        "",
        "## DeviceRuntime.predict through the host's edge and cloud servers",
        "",
        "| device format | inputs | label agreement | route agreement | max abs diff probabilities "
        "| aarch64 routes | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for fmt, p in report["predict_through_servers"].items():
        routes = ", ".join(f"{k} {v}" for k, v in sorted(p["aarch64_routes"].items()))
        lines.append(
            f"| {fmt} | {p['inputs']} | {p['label_agreement']:.3f} | {p['route_agreement']:.3f} | "
            f"{p['max_abs_diff_probabilities']:.2e} | {routes} | {p['aarch64_errors']} |"
        )
    s = report["service_in_root"]
    lines += [
        "",
        f"`cartosplit serve-device` inside the root (called from the host over loopback): health {s['health_status']}, "
        f"classify {s['classify_status']} ({s['answers']} answers, label agreement with x86 "
        f"{s['label_agreement_with_x86_predict']:.3f}), bad JSON {s['bad_request_status']}, served after it "
        f"{s['served_after_bad_request']}, exit code after SIGTERM {s['exit_code_after_sigterm']}.",
        "",
        "## Installed size of `cartosplit[device]` (fresh environment, PyPI wheels)",
        "",
        "| architecture | cartosplit[device] and its dependencies | whole site-packages | largest packages |",
        "|---|---|---|---|",
    ]
    for arch, z in report["installed_size"].items():
        top = ", ".join(f"{r['name']} {_mb(r['bytes'])}" for r in z["closure"][:5])
        lines.append(f"| {arch} | {_mb(z['closure_bytes'])} MB | {_mb(z['site_packages_bytes'])} MB | {top} (MB) |")
    heavy = {arch: z["heavy_packages_present"] for arch, z in report["installed_size"].items()}
    for arch, z in report["installed_size"].items():
        pulled = ", ".join(f"{r['name']} {r['version']} ({_mb(r['bytes'])})" for r in z["closure"])
        lines += ["", f"{arch}, everything `cartosplit[device]` installed (MB): {pulled}."]
    lines += [
        "",
        f"Heavy packages installed (torch, transformers, tensorflow, jax, litert-torch): {heavy}. "
        "site-packages also holds the venv's own pip (and setuptools where present), outside the closure.",
        "",
    ]
    lines += bounds_table(report["checks"])
    t = report["emulated_timings_not_device_timings"]
    lines += [
        "",
        f"Timing ({t['note']}): the aarch64 outputs step took {t['aarch64_step_wall_s']} s against "
        f"{t['x86_step_wall_s']} s natively on the same host (load average {t['host_load_average_1min']['before']} "
        f"before, {t['host_load_average_1min']['after']} after, on 2 cores shared with other jobs).",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cartosplit.benchmarks.aarch64_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("outputs", help="device graphs (+ predict through servers) on fixed inputs; torch-free")
    p.add_argument("--bundle", required=True)
    p.add_argument("--inputs", required=True, help="inputs.json written by `verify`")
    p.add_argument("--out", required=True, help="path prefix for .npz and .json")
    p.add_argument("--formats", type=lambda s: s.split(","), help="device formats (default: all in the bundle)")
    p.add_argument("--predict-formats", type=lambda s: s.split(","), default=["onnx-int8"])
    p.add_argument("--edge", help="edge server HOST:PORT for the predict run")
    p.add_argument("--cloud", help="cloud server HOST:PORT for the predict run")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_outputs)
    p = sub.add_parser("sizes", help="installed size of cartosplit[device] in this environment; torch-free")
    p.add_argument("--out", help="JSON file (default: stdout)")
    p.set_defaults(func=cmd_sizes)
    p = sub.add_parser("verify", help="host side: run everything and write the report (called by the script)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--root", required=True, help="the arm64 root, with /mnt/bundle and /mnt/work mounted")
    p.add_argument("--work", required=True, help="host folder mounted at /mnt/work in the root")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--data-dir")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--qemu-cpu", default="cortex-a72")
    p.add_argument("--qemu-version", default="unknown")
    p.add_argument("--qemu-path", default="unknown")
    p.add_argument("--out", default="benchmarks/results/aarch64")
    p.add_argument("--command", default="scripts/verify-aarch64")
    p.set_defaults(func=cmd_verify)
    args = parser.parse_args(argv)
    if getattr(args, "samples", 1) < 1:
        parser.error("--samples must be >= 1")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
