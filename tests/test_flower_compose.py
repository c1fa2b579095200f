"""docker-compose.yml and the Dockerfile match the local deployment (no Docker engine here).

Both the compose services and the processes the local-deployment test starts are built by
scripts/local_deployment.py:service_commands; this parses the compose file and checks it.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from scripts import local_deployment as dep

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_is_the_generated_one():
    assert (ROOT / "docker-compose.yml").read_text() == dep.compose_yaml(2), (
        "docker-compose.yml drifted; regenerate with "
        "`python scripts/local_deployment.py --write-compose docker-compose.yml`")


def test_each_compose_service_runs_the_local_deployment_command():
    services = _compose()["services"]
    expected = dep.compose_commands(2)
    assert list(services) == list(expected)
    for name, svc in services.items():
        argv = [*svc["entrypoint"], *svc["command"]]
        assert argv == expected[name], name
    # the same flags (names and order) as the processes started on 127.0.0.1
    local = dep.service_commands(2, bind_host="127.0.0.1", superlink=("127.0.0.1", 40001),
                                 supernodes=[("127.0.0.1", 40002), ("127.0.0.1", 40003)])
    for name, argv in expected.items():
        flags = [a for a in argv if a.startswith("-")]
        assert flags == [a for a in local[name] if a.startswith("-")], name
        assert argv[0] == local[name][0]


def test_compose_layout_follows_flowers_guide():
    services = _compose()["services"]
    version = dep.FLWR_VERSION
    assert services["superlink"]["image"] == f"flwr/superlink:{version}"
    assert services["superlink"]["ports"] == [f"{dep.SUPERLINK_PORT}:{dep.SUPERLINK_PORT}"]
    link = f"superlink:{dep.SUPERLINK_PORT}"
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
    assert services["superexec-serverapp"]["command"][-1] == link
    assert "--isolation" in services["superlink"]["command"]


def test_dockerfile_builds_on_the_pinned_official_superexec_image():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)$", text, re.M).group(1)
    assert base == f"flwr/superexec:{dep.FLWR_VERSION}"
    pinned = re.search(r'"flwr\[simulation\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned.group(1) == dep.FLWR_VERSION
    for package in ("fedquant", "clients", "server", "simulations"):
        assert f"COPY {package} ./{package}" in text
    assert 'ENTRYPOINT ["flower-superexec"]' in text
