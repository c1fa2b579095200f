"""TLS with bearer tokens and mutual TLS, with certificates generated here; a client without
a certificate (mTLS) or without a token (TLS + tokens) is rejected."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from helpers_server import ServerProcess, make_certificates

import fedquant as fq
from fedquant.clients.grpc_client import AggregatorClient

OPERATOR = "operator-secret"
TOKENS = {"operator": OPERATOR, "1": "client-one-secret"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


def _roundtrip(client: AggregatorClient, round_id: str) -> None:
    client.open_round(round_id, "eden", {"bits": 2}, round_seed=3, shape=[128], expected=1)
    enc = client.encode(round_id, 1, torch.randn(128))
    client.push(round_id, 1, enc)
    torch.testing.assert_close(client.get_mean(round_id, wait_s=20), fq.decode(enc))


def test_tls_with_tokens(tmp_path, certs):
    (tmp_path / "tokens.json").write_text(json.dumps(TOKENS))
    server = ServerProcess(tmp_path, "--tls-cert", str(certs["server.pem"]),
                           "--tls-key", str(certs["server.key"]),
                           "--tokens", str(tmp_path / "tokens.json"))
    target = f"localhost:{server.port}"
    try:
        with AggregatorClient(target, root_cert=certs["ca.pem"], token=OPERATOR) as op:
            op.open_round("tls", "eden", {"bits": 2}, round_seed=3, shape=[128], expected=1)
        with AggregatorClient(target, root_cert=certs["ca.pem"], token=TOKENS["1"]) as c:
            enc = c.encode("tls", 1, torch.randn(128))
            c.push("tls", 1, enc)
            torch.testing.assert_close(c.get_mean("tls", wait_s=20), fq.decode(enc))
        with AggregatorClient(target, root_cert=certs["ca.pem"], retries=0) as anonymous:
            with pytest.raises(grpc.RpcError) as err:
                anonymous.push("tls", 1, enc)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                anonymous.get_mean("tls")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with AggregatorClient(target, insecure=True, token=TOKENS["1"], retries=0) as plain:
            with pytest.raises(grpc.RpcError) as err:  # plaintext to a TLS port
                plain.round_status("tls")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_mutual_tls(tmp_path, certs):
    server = ServerProcess(tmp_path, "--tls-cert", str(certs["server.pem"]),
                           "--tls-key", str(certs["server.key"]),
                           "--tls-client-ca", str(certs["ca.pem"]))
    try:
        with AggregatorClient(f"127.0.0.1:{server.port}", root_cert=certs["ca.pem"],
                              client_cert=certs["client.pem"],
                              client_key=certs["client.key"],
                              token=server.admin_token) as c:
            _roundtrip(c, "mtls")
        with AggregatorClient(f"127.0.0.1:{server.port}", root_cert=certs["ca.pem"],
                              retries=0) as no_cert:
            with pytest.raises(grpc.RpcError) as err:
                no_cert.round_status("mtls")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # handshake refused
    finally:
        server.stop()
