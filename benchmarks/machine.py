"""Where a benchmark ran: architecture, CPU model, cores, Python and key package versions."""

from __future__ import annotations

import contextlib
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def describe_machine(packages: tuple[str, ...] = ("torch", "onnxruntime", "ai-edge-litert")) -> str:
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = []
    for name in packages:
        with contextlib.suppress(PackageNotFoundError):
            versions.append(f"{name} {version(name)}")
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, " + ", ".join(
        versions
    )
