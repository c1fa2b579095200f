"""Real Flower processes on 127.0.0.1: `flwr run .` on the simulation engine, and a local
deployment (SuperLink, SuperExecs, SuperNodes as separate processes, as docker-compose.yml
lays them out). Ephemeral ports; every process is stopped by PID (scripts/local_deployment).
Kept to 2 rounds, 2 clients, one local epoch of logistic regression: start-up dominates.
"""

from __future__ import annotations

import socket

import pytest
import torch

import fedquant as fq
from fedquant.fl import task as fl_task
from scripts import local_deployment as dep

RUN_CONFIG = {"num-server-rounds": 2, "model": "logreg", "partitioning": "iid",
              "local-epochs": 1, "lr": 0.2, "codec": "eden:bits=2"}


def _check_rounds(rows: list[dict]) -> None:
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["accuracy"] > rows[0]["accuracy"] + 0.2  # learned from compressed updates
    task = fl_task.load_task("digits", 0)
    d = task.num_features * task.num_classes + task.num_classes
    size = fq.get_codec("eden", bits=2).encode(torch.randn(d), seed=2**64 - 1).nbytes
    for r in rows[1:]:
        assert (r["replied"], r["failed"], r["dropped"]) == (2, 0, 0)
        # two payloads per round, each one eden b=2 encoding of the d parameters (up to
        # 9 bytes shorter with a shorter varint seed): about 16x less than fp32
        assert 2 * (size - 9) <= r["uplink_bytes"] <= 2 * size < 2 * 4 * d / 8
        assert r["downlink_bytes"] >= 2 * 4 * d


def _port_is_closed(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) != 0


@pytest.mark.timeout(420)
def test_flwr_run_dot_from_a_fresh_clone_uses_this_environment(tmp_path):
    # the README's command: `flwr run . --stream` with no connection configured, so flwr
    # starts its background SuperLink (simulation engine), here on free ports
    config = {**RUN_CONFIG, "final-ptq-bits": 4}  # + SPFQ of the final model (sub-second)
    (*rows, ptq), output, port = dep.run_local(tmp_path, config, timeout=400)
    _check_rounds(rows)
    assert (ptq["final_ptq"], ptq["bits"]) == ("spfq", 4)
    assert ptq["accuracy_before"] == rows[-1]["accuracy"] and abs(ptq["accuracy_drop"]) < 0.05
    assert 0 < 4 * ptq["ptq_bytes"] < ptq["fp32_bytes"]
    home = tmp_path / "flwr_home"
    assert 'default = "local"' in (home / "config.toml").read_text()  # flwr's own default
    assert "[ROUND 2/2]" in output  # --stream: the run's log came to the terminal
    # no app environment was built (Flower's default `uv sync` would download torch)
    assert not (home / "runtime-envs").exists() or not any((home / "runtime-envs").iterdir())
    assert dep.local_superlinks(port) == [] and _port_is_closed(f"127.0.0.1:{port}")


@pytest.mark.timeout(420)
def test_local_deployment_with_superlink_and_supernode_processes(tmp_path):
    started = {}
    rows = dep.run_app(tmp_path, RUN_CONFIG, num_supernodes=2, timeout=400, started=started)
    _check_rounds(rows)
    link = started.pop("superlink-address")
    assert sorted(started) == sorted(dep.compose_commands(2))  # docker-compose's services
    assert all(p.poll() is not None for p in started.values())  # all stopped
    assert _port_is_closed(link)
