"""The secured deployments as local processes, with credentials the test makes
(scripts/generate_certs.py): Flower with TLS and SuperNode authentication (the flags of
docker-compose.with-tls.yml and docker-compose.with-auth.yml), and ``fedquant serve``
behind TLS with tokens, its health check and its pushing clients (the commands of
docker-compose.server.yml). Kept to 2 rounds, 2 SuperNodes, logistic regression.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_private_key,
    load_ssh_public_key,
)

from scripts import generate_certs
from scripts import local_deployment as dep

RUN_CONFIG = {"num-server-rounds": 2, "model": "logreg", "partitioning": "iid",
              "local-epochs": 1, "lr": 0.2, "codec": "eden:bits=2"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certificates")
    generate_certs.generate(out, supernodes=2, tokens=2, sans=["my-host.example.org"])
    return out


def test_generated_credentials_are_what_flower_and_the_server_load(certs):
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises on a wrong signature or issuer
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "superlink", "fedquant-server", "my-host.example.org"} <= set(
        sans.get_values_for_type(x509.DNSName))
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for i in (1, 2):  # Flower's SuperNode keys: OpenSSH EC on a NIST curve, pairs that match
        key = load_ssh_private_key((certs / f"supernode-{i}").read_bytes(), None)
        pub = load_ssh_public_key((certs / f"supernode-{i}.pub").read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH) == \
            pub.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    assert (certs / "supernode-1.pub").read_bytes() != (certs / "supernode-2.pub").read_bytes()
    tokens = json.loads((certs / "tokens.json").read_text())
    assert sorted(tokens) == ["1", "2", "operator"] and len(set(tokens.values())) == 3
    assert all(len(t) >= 32 for t in tokens.values())
    assert (certs / "client-2.token").read_text() == tokens["2"]
    for name in ("ca.key", "server.key", "supernode-1", "tokens.json", "client-1.token"):
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o600, name


def test_bad_credentials_requests_are_refused(tmp_path):
    with pytest.raises(ValueError, match="subject alternative name"):
        generate_certs.generate(tmp_path, sans=["two words"])
    with pytest.raises(ValueError, match="supernodes >= 0"):
        generate_certs.generate(tmp_path, supernodes=-1)
    with pytest.raises(ValueError, match="needs TLS"):
        dep.superlink_args("127.0.0.1", 1, node_auth=True)
    with pytest.raises(ValueError, match="needs TLS"):
        dep.supernode_args("127.0.0.1:1", 0, 1, "127.0.0.1", 2, auth_key="k")


@pytest.mark.timeout(300)
def test_tls_and_supernode_authentication_complete_two_rounds(tmp_path, certs):
    started: dict = {}
    rows = dep.run_app(tmp_path, RUN_CONFIG, num_supernodes=2, certs=certs, node_auth=True,
                       timeout=280, started=started)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["accuracy"] > rows[0]["accuracy"] + 0.2
    assert all((r["replied"], r["failed"]) == (2, 0) for r in rows[1:])
    started.pop("superlink-address")
    assert all(p.poll() is not None for p in started.values())  # all stopped
    argv = {name: p.args for name, p in started.items()}
    assert "--enable-supernode-auth" in argv["superlink"]
    assert not any("--insecure" in argv[n] for n in ("superlink", "superexec-serverapp",
                                                     "supernode-1", "supernode-2"))
    logs = tmp_path / "logs"
    assert "Uvicorn running on https://" in (logs / "superlink.log").read_text()
    # each SuperNode ran under the node id its public key was registered with
    registered = re.findall(r"SuperNode (\d+) registered",
                            (logs / "flwr_supernode_register.log").read_text())
    ran = [re.search(r"SuperNode ID: (\d+)", (logs / f"supernode-{i}.log").read_text())
           .group(1) for i in (1, 2)]
    assert len(registered) == 2 and sorted(ran) == sorted(registered)


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([dep._executable(argv[0]), *argv[1:]], capture_output=True,
                          text=True, check=False, **kw)


def _healthy(address: str, ca: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", dep.HEALTHCHECK, address, str(ca)],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.timeout(180)
def test_fedquant_serve_as_composed_with_tls_tokens_and_health_check(tmp_path, certs):
    port = dep.free_port()
    rounds = tmp_path / "rounds.toml"
    rounds.write_text(dep.rounds_toml(2))
    commands = dep.server_commands(certs=str(certs), data_dir=str(tmp_path / "data"),
                                   rounds_file=str(rounds), host="127.0.0.1", port=port,
                                   target=f"localhost:{port}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen([dep._executable("fedquant"), *commands["fedquant-server"][1:]],
                                  stdout=out, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    try:
        dep._wait_for_port(port, server, 60, log)
        health = _healthy(f"localhost:{port}", certs / "ca.crt")
        assert health.returncode == 0, health.stderr
        other = tmp_path / "other-ca"
        generate_certs.make_ca(other)
        assert _healthy(f"localhost:{port}", other / "ca.crt").returncode != 0  # wrong CA
        clients = [subprocess.Popen(
            [dep._executable("fedquant"), *argv[1:], "--mean-out", str(tmp_path / f"{n}.pt")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            for n, argv in commands.items() if n != "fedquant-server"]
        outputs = [c.communicate(timeout=150)[0].decode() for c in clients]
        assert [c.returncode for c in clients] == [0, 0], outputs
        means = [torch.load(tmp_path / f"fedquant-client-{i}.pt") for i in (1, 2)]
        assert means[0].shape == (4096,) and torch.equal(means[0], means[1])
        assert torch.isfinite(means[0]).all() and means[0].abs().sum() > 0
        # a wrong token is refused
        bad = tmp_path / "bad.token"
        bad.write_text("not-a-valid-token-at-all")
        argv = commands["fedquant-client-1"]
        argv = argv[:argv.index("--token-file") + 1] + [str(bad)] + \
            argv[argv.index("--token-file") + 2:argv.index("--wait-mean")] + ["--retries", "0"]
        assert _run(argv, timeout=60, env=env).returncode != 0
    finally:
        dep.stop({"fedquant-server": server})


@pytest.mark.timeout(120)
def test_a_supernode_whose_key_was_not_registered_is_refused(tmp_path, certs):
    port = dep.free_port()
    env = dep._env(tmp_path / "flwr_home")
    procs: dict[str, subprocess.Popen] = {}
    link_log, node_log = tmp_path / "superlink.log", tmp_path / "supernode.log"
    try:
        with link_log.open("wb") as out:
            argv = dep.superlink_args("127.0.0.1", port, certs=str(certs), node_auth=True)
            procs["superlink"] = subprocess.Popen(
                [dep._executable(argv[0]), *argv[1:]], stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True)
        dep._wait_for_port(port, procs["superlink"], 60, link_log)
        with node_log.open("wb") as out:  # a valid key pair, never registered
            argv = dep.supernode_args(f"127.0.0.1:{port}", 0, 1, "127.0.0.1", dep.free_port(),
                                      certs=str(certs), auth_key=str(certs / "supernode-1"))
            procs["supernode"] = subprocess.Popen(
                [dep._executable(argv[0]), *argv[1:]], stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True)
        assert procs["supernode"].wait(timeout=90) != 0
        assert "No SuperNode found with the given public key" in link_log.read_text()
        assert "Failed to activate SuperNode" in node_log.read_text()
    finally:
        dep.stop(procs)
