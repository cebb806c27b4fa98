"""The package map: one import namespace, ``cartosplit.*``, over the repository's top-level folders.

Everything else about the distribution is in pyproject.toml. The map lives here, not in pyproject, for one
reason: a tier's container image copies only the folders that tier runs (deploy/docker/Dockerfile.edge has
no cloud_server/ and no benchmarks/), and a package whose folder is absent must then be left out instead of
failing the install.
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# import name -> folder (the folders are the contracts; README "Layout" says what each owns)
FOLDERS = {
    "cartosplit": "cartosplit",
    "cartosplit.export": "export",
    "cartosplit.device_runtime": "device_runtime",
    "cartosplit.serving": "serving",
    "cartosplit.edge_server": "edge_server",
    "cartosplit.cloud_server": "cloud_server",
    "cartosplit.protos": "protos",
    "cartosplit.benchmarks": "benchmarks",
}
PRESENT = {name: folder for name, folder in FOLDERS.items() if (ROOT / folder / "__init__.py").is_file()}

setup(
    package_dir=PRESENT,
    packages=list(PRESENT),
    package_data={
        "cartosplit.protos": ["*.proto", "*.pyi"],
        "cartosplit.benchmarks": ["*.json", "results/device-profiles/*.json"],
    },
)
