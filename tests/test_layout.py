"""The installed layout: one ``cartosplit`` namespace, package data in the wheel, a tier image that copies only
its own folders still installs and starts.

Each test installs the checkout with pip (no network: ``--no-deps --no-build-isolation``) into a temporary
folder, then imports from there with ``python -S`` so that the editable install of the checkout (a
``.pth`` finder that maps every ``cartosplit.*`` folder) cannot stand in for a missing package.
"""

from __future__ import annotations

import ast
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIER_FILES = ("pyproject.toml", "setup.py", "README.md")
PIP_INSTALL = (sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation")
PIP_INSTALL += ("--disable-pip-version-check",)


def _install(source: Path, target: Path) -> Path:
    """pip-install ``source`` into the folder ``target`` (what site-packages would receive) and return it.

    ``--target``, not ``--prefix``: with a prefix pip uninstalls the running venv's editable cartosplit first.
    """
    subprocess.run(
        [*PIP_INSTALL, "--target", str(target), str(source)],
        check=True,
        capture_output=True,
        cwd=target.parent,
    )
    return target


def _python_without_the_checkout(site_dir: Path, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` seeing the install under ``site_dir`` and the venv's third-party packages, not the checkout."""
    third_party = [p for p in site.getsitepackages() if Path(p).is_dir()]
    boot = f"import sys; sys.path[:0] = {[str(site_dir), *third_party]!r}\n"
    return subprocess.run(
        [sys.executable, "-S", "-c", boot + code], capture_output=True, text=True, cwd=site_dir, timeout=120
    )


def _folders() -> dict[str, str]:
    """setup.py's FOLDERS literal (read, not run: running it would call setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["FOLDERS"]:
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no FOLDERS mapping")


def test_every_package_folder_is_in_the_map() -> None:
    folders = _folders()
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert on_disk == set(folders.values()), "setup.py FOLDERS and the package folders differ"
    assert all(name == "cartosplit" or name.startswith("cartosplit.") for name in folders)


def _copy_source(folders: tuple[str, ...] | list[str], into: Path) -> Path:
    """A clean copy of the checkout's files for ``folders`` (installing the checkout itself would reuse its
    ignored build/ folder, stale files included)."""
    into.mkdir()
    for name in TIER_FILES:
        shutil.copy(ROOT / name, into / name)
    for folder in folders:
        shutil.copytree(ROOT / folder, into / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return into


def test_pip_install_puts_only_cartosplit_into_site_packages(tmp_path: Path) -> None:
    site_dir = _install(_copy_source(list(_folders().values()), tmp_path / "source"), tmp_path / "site")
    names = sorted(p.name for p in site_dir.iterdir() if p.name != "bin")  # bin/: the console script
    assert len(names) == 2 and names[0] == "cartosplit", names
    assert names[1].startswith("cartosplit-") and names[1].endswith(".dist-info"), names
    installed = site_dir / "cartosplit"
    assert {p.name for p in installed.iterdir() if p.is_dir()} - {"__pycache__"} == {
        name.split(".")[1] for name in _folders() if "." in name
    }
    # package data: every data file beside the code (the benchmarks' power/device profiles, the proto), and the
    # named cost profiles `calibrate --costs pi4-wifi` loads
    data = [p.relative_to(ROOT) for p in (*ROOT.glob("benchmarks/*.json"), *ROOT.glob("protos/*.proto"))]
    data += [p.relative_to(ROOT) for p in ROOT.glob("benchmarks/results/device-profiles/*--*.json")]
    assert len(data) > 20
    missing = [str(rel) for rel in data if not (installed / rel).is_file()]
    assert not missing, f"not in the installed package: {missing}"
    done = _python_without_the_checkout(site_dir, "import cartosplit, cartosplit.protos.tiers_pb2; print('ok')")
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


@pytest.mark.parametrize(
    ("tier", "folders", "absent"),
    [
        ("edge", ("cartosplit", "device_runtime", "serving", "edge_server", "protos"), ("cloud_server", "benchmarks")),
        ("cloud", ("cartosplit", "device_runtime", "serving", "cloud_server", "protos"), ("edge_server", "benchmarks")),
    ],
)
def test_a_tier_image_installs_and_starts_from_its_own_folders(
    tmp_path: Path, tier: str, folders: tuple[str, ...], absent: tuple[str, ...]
) -> None:
    """What deploy/docker/Dockerfile.<tier> copies is enough: the server module and the CLI import."""
    site_dir = _install(_copy_source(folders, tmp_path / "source"), tmp_path / "site")
    installed = {p.name for p in (site_dir / "cartosplit").iterdir()}
    assert not installed & set(absent), f"the {tier} install holds {sorted(installed & set(absent))}"
    code = (
        f"import cartosplit.{tier}_server.server\n"
        "from cartosplit.cli import main\n"
        "try:\n"
        f"    main(['serve-{tier}', '--help'])\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0, stop.code\n"
        f"leaked = sorted(m for m in sys.modules if m.split('.')[:2] in {[['cartosplit', a] for a in absent]!r})\n"
        "assert not leaked, leaked\n"
        "print('ok')\n"
    )
    done = _python_without_the_checkout(site_dir, code)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("ok"), done.stdout[-2000:] + done.stderr[-4000:]


# What each folder may import from the kit (README "Layout"); every import counts, function-local ones too.
# cartosplit.cli_args (shared argparse types) and the cartosplit root (version) are open to all.
MAY_IMPORT = {
    "cartosplit": set(),  # the CLI names its command modules as strings and imports them lazily
    "protos": set(),
    "device_runtime": {"protos"},
    "serving": {"device_runtime", "protos"},
    "edge_server": {"serving", "device_runtime", "protos"},
    "cloud_server": {"serving", "device_runtime", "protos"},
    "export": {"device_runtime", "protos", "serving"},  # serving: the demo starts the tiers (serving.process)
    "benchmarks": {"export", "device_runtime", "protos", "serving", "edge_server", "cloud_server"},
}
NEVER_TORCH = ("device_runtime", "protos", "serving", "edge_server", "cloud_server", "cartosplit")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_folders_import_only_what_they_may() -> None:
    folders = {v: k for k, v in _folders().items()}
    wrong = []
    for folder, allowed in MAY_IMPORT.items():
        assert folder in folders, folder
        for path in sorted((ROOT / folder).glob("*.py")):
            for name in _imports(path):
                parts = name.split(".")
                if folder in NEVER_TORCH and parts[0] in ("torch", "transformers"):
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
                if parts[0] != "cartosplit" or len(parts) == 1 or parts[1] == "cli_args":
                    continue
                target = parts[1]
                if target != folder and target not in allowed and f"cartosplit.{target}" in _folders():
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "imports across the folder contracts:\n" + "\n".join(wrong)
