"""Layers run one way: the library (fedquant/) < the apps (server/, clients/) < the
experiments (simulations/); the installed distribution holds one top-level package."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the optional integrations of the library that may import a framework
INTEGRATIONS = {"flower": {"flwr"}, "ddp.py": set()}


def _imports(path: Path) -> set[str]:
    """Every module name `path` imports (absolute imports; relative ones stay inside)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _violations(folder: str, forbidden: set[str], allowed_integration: bool = False):
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT / folder)
        if "_proto" in rel.parts:
            continue
        extra = set()
        if allowed_integration:
            extra = INTEGRATIONS.get(rel.parts[0], set())
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden - extra):
                yield f"{folder}/{rel} imports {name}"


def test_the_library_imports_no_framework_server_app_or_experiment():
    forbidden = {"flwr", "grpc", "fedquant.server", "fedquant.clients", "fedquant.simulations",
                 "server", "clients", "simulations"}
    assert list(_violations("fedquant", forbidden, allowed_integration=True)) == []


def test_the_apps_import_only_the_library_and_never_each_other():
    assert list(_violations("server", {"fedquant.clients", "fedquant.simulations", "clients",
                                       "simulations"})) == []
    assert list(_violations("clients", {"fedquant.server", "fedquant.simulations", "server",
                                        "simulations"})) == []


def test_the_rule_catches_a_wrong_import(tmp_path, monkeypatch):
    """The checker itself: a library module importing the server is reported."""
    lib = tmp_path / "fedquant"
    lib.mkdir()
    (lib / "bad.py").write_text("from fedquant.server import rounds\nimport grpc\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = list(_violations("fedquant", {"grpc", "fedquant.server"}))
    assert len(found) == 2


def test_importing_the_core_loads_no_framework():
    code = ("import sys, fedquant, fedquant.fl, fedquant.robust; "
            "print(sorted(m for m in ('flwr', 'grpc', 'fedquant.server', 'fedquant.simulations')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT / "tests")
    assert out.stdout.strip() == "[]"


@pytest.mark.timeout(300)
def test_the_wheel_holds_only_the_fedquant_package(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("fedquant-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"fedquant"}
    for module in ("fedquant/py.typed", "fedquant/flower/mod.py", "fedquant/fl/protocol.py",
                   "fedquant/ddp.py", "fedquant/server/aggregator.py",
                   "fedquant/clients/grpc_client.py", "fedquant/simulations/cli.py",
                   "fedquant/data/quicfl_tables.npz", "fedquant/simulations/configs/compare.toml"):
        assert module in names, module
    # every package folder of the repository made it into the wheel
    for folder in ("fedquant", "server", "clients", "simulations"):
        for init in (ROOT / folder).rglob("__init__.py"):
            if "examples" in init.parts and "flower_app" in init.parts:
                continue  # the example Flower app is its own project, not part of fedquant
            rel = init.relative_to(ROOT / folder)
            prefix = "fedquant" if folder == "fedquant" else f"fedquant/{folder}"
            assert f"{prefix}/{rel.as_posix()}" in names, init
