"""The CLI imports only the command it runs: what a device loads, the install hint, the command table."""

from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import replace

import pytest

from cartosplit import cli

# what a device must never load for `cartosplit --help` or `cartosplit run`
HEAVY = ("torch", "transformers", "grpc_health", "grpc_reflection", "prometheus_client", "ray")
HEAVY_PACKAGES = ("export", "serving", "edge_server", "cloud_server", "benchmarks")

LOADED = f"""
import sys
import cartosplit.device_runtime
from cartosplit.cli import main
try:
    main({{argv!r}})
except SystemExit as stop:
    assert stop.code == 0, stop.code
heavy = {HEAVY!r}
packages = {HEAVY_PACKAGES!r}
loaded = sorted(
    m for m in sys.modules
    if m.split(".")[0] in heavy or (m.startswith("cartosplit.") and m.split(".")[1] in packages)
)
print("LOADED", " ".join(loaded))
"""


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"]], ids=["help", "run-help"])
def test_a_device_command_loads_no_workstation_or_server_module(argv):
    done = subprocess.run([sys.executable, "-c", LOADED.format(argv=argv)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("LOADED")]
    loaded = line.split()[1:]
    assert not loaded, f"`cartosplit {' '.join(argv)}` loaded {loaded}"


def test_top_level_help_imports_no_command_module(capsys):
    before = set(sys.modules)
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"])
    assert stop.value.code == 0
    modules = {c.module for c in cli.COMMANDS.values()}
    assert not (set(sys.modules) - before) & modules
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_in_the_table_has_its_functions(name, capsys):
    command = cli.COMMANDS[name]
    module = importlib.import_module(command.module)
    assert callable(getattr(module, command.arguments, None)), f"{command.module} has no {command.arguments}"
    assert callable(getattr(module, command.run, None)), f"{command.module} has no {command.run}"
    try:
        code = cli.main([name, "--help"])  # bench answers its own --help and returns
    except SystemExit as stop:
        code = stop.code
    assert code == 0
    assert f"usage: cartosplit {name}" in capsys.readouterr().out


def _command_importing(tmp_path, monkeypatch, name: str, body: str) -> None:
    """Point ``name`` in the command table at a throwaway module whose import runs ``body``."""
    (tmp_path / "throwaway_command.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "throwaway_command", raising=False)
    monkeypatch.setitem(cli.COMMANDS, name, replace(cli.COMMANDS[name], module="throwaway_command"))


def test_a_missing_extra_is_one_line_naming_it_and_exit_code_2(tmp_path, monkeypatch, capsys):
    _command_importing(tmp_path, monkeypatch, "serve-edge", "import grpc_health_is_not_installed\n")
    assert cli.main(["serve-edge", "--bundle", "b", "--cloud", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cartosplit serve-edge needs the server extra (") and "grpc_health_is_not_installed" in err
    assert err.endswith(": pip install 'cartosplit[server]'\n") and err.count("\n") == 1


def test_a_missing_torch_names_the_pinned_install(tmp_path, monkeypatch, capsys):
    _command_importing(tmp_path, monkeypatch, "calibrate", "import sys\nsys.modules['torch'] = None\nimport torch\n")
    monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch"))  # put back what the module blocks
    assert cli.main(["calibrate", "--run", "r"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cartosplit calibrate needs the export extra (")
    assert err.rstrip().endswith("pip install torch==2.13.0 && pip install 'cartosplit[export,default-model]'")


def test_a_command_whose_package_is_not_installed_says_so(tmp_path, monkeypatch, capsys):
    # a tier image copies only its own folders (no benchmarks/ in deploy/docker/Dockerfile.edge)
    _command_importing(tmp_path, monkeypatch, "bench", "import cartosplit.no_such_package.cli\n")
    assert cli.main(["bench", "latency"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cartosplit bench is not part of this install (") and "no_such_package" in err


def test_an_import_error_of_our_own_is_not_hidden(tmp_path, monkeypatch):
    _command_importing(tmp_path, monkeypatch, "run", "from cartosplit.device_runtime.bundle import no_such_name\n")
    with pytest.raises(ImportError, match="no_such_name"):
        cli.main(["run", "--bundle", "b"])
