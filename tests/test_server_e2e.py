"""End to end against a real server subprocess on 127.0.0.1: the mean of concurrent clients
equals fq.decode_mean of the same payloads, chunked pushes above 4 MiB, round closing (quorum,
deadline, operator), GetMean chunks, health, reflection, metrics and the `push` CLI."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import grpc
import pytest
import torch
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers_server import ServerProcess
from typer.testing import CliRunner

import fedquant as fq
from fedquant.clients import cli as clients_cli
from fedquant.clients.grpc_client import AggregatorClient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def metrics_port():
    return _free_port()


@pytest.fixture(scope="module")
def server(tmp_path_factory, metrics_port):
    proc = ServerProcess(tmp_path_factory.mktemp("e2e"), "--insecure",
                         "--metrics-port", str(metrics_port))
    yield proc
    proc.stop()


@pytest.fixture()
def client(server):
    with AggregatorClient(server.target, insecure=True, token=server.admin_token) as c:
        yield c


def test_mean_of_ten_concurrent_clients_equals_decode_mean(client, server):
    d, n = 3000, 10  # not a power of two: exercises the padded tail
    client.open_round("mean10", "eden", {"bits": 2}, round_seed=11, shape=[d], expected=n)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(d, generator=gen) * (1 + i) for i in range(n)]
    weights = [1.0 + 0.5 * i for i in range(n)]
    encs = [client.encode("mean10", i, xs[i]) for i in range(n)]
    results = [None] * n

    def push(i):
        with AggregatorClient(server.target, insecure=True) as own:
            results[i] = own.push("mean10", i, encs[i], weights[i])

    threads = [threading.Thread(target=push, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and not r.already_recorded for r in results)
    assert [r.nbytes for r in results] == [e.nbytes for e in encs]  # bytes on the wire
    mean = client.get_mean("mean10", wait_s=30)
    expected = fq.decode_mean(encs, weights)
    assert mean.shape == expected.shape
    torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-6)
    status = client.round_status("mean10")
    assert status.close_reason == "quorum"
    assert sorted(p.client_id for p in status.pushes) == list(range(n))
    assert status.bytes_received == sum(e.nbytes for e in encs)


def test_chunked_push_above_4_mib(client):
    d = 1_500_000  # fp32: 6 MB, above gRPC's 4 MiB message limit; 6 chunks of 1 MiB
    client.open_round("big", "fp32", round_seed=3, shape=[d], expected=2)
    xs = [torch.randn(d), torch.randn(d)]
    encs = [client.encode("big", i, xs[i]) for i in range(2)]
    assert encs[0].nbytes > 4 * 1024 * 1024
    for i in range(2):
        assert client.push("big", i, encs[i]).nbytes == encs[i].nbytes
    mean = client.get_mean("big", wait_s=30)  # 6 MB back, in 1 MiB float32 chunks
    torch.testing.assert_close(mean, (xs[0] + xs[1]) / 2)


def test_get_mean_waits_for_operator_close_and_deadline(client, server):
    client.open_round("manual", "eden", {"bits": 1}, round_seed=1, shape=[64], expected=5)
    x = torch.randn(64)
    enc = client.encode("manual", 4, x)
    client.push("manual", 4, enc)
    with pytest.raises(grpc.RpcError) as err:
        client.get_mean("manual")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "still open" in err.value.details()
    assert client.close_round("manual").close_reason == "operator"
    torch.testing.assert_close(client.get_mean("manual"), fq.decode(enc))

    client.open_round("timed", "eden", round_seed=2, shape=[64], expected=5, deadline_s=0.5)
    enc = client.encode("timed", 1, x)
    client.push("timed", 1, enc)
    started = time.monotonic()
    mean = client.get_mean("timed", wait_s=20)
    assert time.monotonic() - started < 10
    assert client.round_status("timed").close_reason == "deadline"
    torch.testing.assert_close(mean, fq.decode(enc))

    client.open_round("empty", "eden", shape=[8], deadline_s=0.1)
    with pytest.raises(grpc.RpcError) as err:
        client.get_mean("empty", wait_s=20)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no pushes" in err.value.details()


def test_health_reflection_and_metrics(server, client, metrics_port):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fedquant.v1.Aggregator"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert {"fedquant.v1.Aggregator", "grpc.health.v1.Health"} <= names
    client.open_round("metered", "eden", shape=[32], expected=1)
    client.push_tensor("metered", 9, torch.randn(32))
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=10).read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines()}
    assert values['fedquant_pushes_total{status="OK"}'] >= 1
    assert values["fedquant_push_bytes_total"] > 0
    assert values["fedquant_decode_seconds_total"] > 0


def test_push_cli_with_random_vector_and_mean(server, client, tmp_path):
    client.open_round("cli", "eden", {"bits": 2}, round_seed=9, shape=[4, 50], expected=1)
    out = tmp_path / "mean.pt"
    app = typer.Typer()
    clients_cli.register(app)
    app.command("noop")(lambda: None)  # two commands: typer keeps `push` as a subcommand
    run = CliRunner().invoke(app, [
        "push", "--target", server.target, "--insecure", "--round", "cli", "--client-id", "5",
        "--random", "--seed", "3", "--wait-mean", "20", "--mean-out", str(out)])
    assert run.exit_code == 0, run.output
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    x = fq.random.normals(3, fq.random.Purpose.PRIVATE, 200).reshape(4, 50)
    enc = client.encode("cli", 5, x)
    assert summary["bytes"] == enc.nbytes
    torch.testing.assert_close(torch.load(out), fq.decode(enc))
    bad = CliRunner().invoke(app, ["push", "--target", server.target, "--insecure",
                                   "--round", "cli", "--client-id", "5"])
    assert bad.exit_code != 0 and "--tensor" in bad.output
