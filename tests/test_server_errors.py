"""Every refusal returns its status code, with a message naming the problem, while an honest
client pushing concurrently to another round completes; and a hypothesis fuzz of the Push
request fields and chunks (the server answers a defined status and keeps serving)."""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from helpers_server import ServerProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedquant as fq
from fedquant._proto import aggregator_pb2 as pb
from fedquant._proto import aggregator_pb2_grpc as pb_grpc
from fedquant.clients.grpc_client import AggregatorClient, PushConflict

CAP = 1024 * 1024  # --max-push-bytes of this server
STALL_S = 4.0  # --push-timeout-s of this server
OPERATOR = "operator-token-0"
TOKENS = {"operator": OPERATOR, **{str(i): f"client-token-{i}" for i in range(40)}}
S = grpc.StatusCode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("errors")
    (data / "tokens.json").write_text(json.dumps(TOKENS))
    proc = ServerProcess(data, "--insecure", "--tokens", str(data / "tokens.json"),
                         "--max-push-bytes", str(CAP), "--push-timeout-s", str(STALL_S),
                         # the error cases below push concurrently with one client's token
                         "--max-streams-per-client", "16")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def operator(server):
    with AggregatorClient(server.target, insecure=True, token=OPERATOR) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.AggregatorStub(channel)


def client_for(server, client_id: int, token: str | None = None) -> AggregatorClient:
    token = TOKENS[str(client_id)] if token is None else token
    return AggregatorClient(server.target, insecure=True, token=token, retries=0)


def raw_push(stub, chunks: list[pb.PushChunk], token: str | None) -> tuple[S, str]:
    """Send chunks as they are; return (status code, details)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        stub.Push(iter(chunks), timeout=30, metadata=metadata)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return S.OK, ""


def header(round_id="victim", client_id=1, weight=1.0, total_bytes=0) -> pb.PushHeader:
    return pb.PushHeader(round_id=round_id, client_id=client_id, weight=weight,
                         total_bytes=total_bytes)


def one_chunk(payload: bytes, **fields) -> list[pb.PushChunk]:
    fields.setdefault("total_bytes", len(payload))
    return [pb.PushChunk(header=header(**fields), data=payload)]


def test_every_error_has_its_status_while_an_honest_client_completes(server, operator, stub):
    d = 256
    operator.open_round("victim", "eden", {"bits": 2}, round_seed=1, shape=[d])
    operator.open_round("cohort", "eden", {"bits": 2}, round_seed=1, shape=[d], cohort=[1, 2])
    operator.open_round("closed", "eden", {"bits": 2}, round_seed=1, shape=[d])
    operator.close_round("closed")
    n_honest = 8
    operator.open_round("honest", "eden", {"bits": 3}, round_seed=5, shape=[1000],
                        expected=n_honest)

    good = operator.encode("victim", 1, torch.randn(d))  # a valid payload for client 1
    blob = good.to_bytes()
    c1 = TOKENS["1"]
    seed1 = fq.random.derive_seed(1, 1)
    cases = {
        "garbage bytes": (S.INVALID_ARGUMENT, one_chunk(b"\xff" * 100), c1),
        "truncated payload": (S.INVALID_ARGUMENT, one_chunk(blob[:-7]), c1),
        "no header": (S.INVALID_ARGUMENT, [pb.PushChunk(data=blob)], c1),
        "no chunks": (S.INVALID_ARGUMENT, [], c1),
        "NaN weight": (S.INVALID_ARGUMENT, one_chunk(blob, weight=math.nan), c1),
        "zero weight": (S.INVALID_ARGUMENT, one_chunk(blob, weight=0.0), c1),
        "bad round id": (S.INVALID_ARGUMENT, one_chunk(blob, round_id="no spaces"), c1),
        "more than declared": (S.INVALID_ARGUMENT, one_chunk(blob, total_bytes=len(blob) - 1),
                               c1),
        "less than declared": (S.INVALID_ARGUMENT, one_chunk(blob, total_bytes=len(blob) + 1),
                               c1),
        "second header": (S.INVALID_ARGUMENT, one_chunk(blob[:10], total_bytes=len(blob))
                          + [pb.PushChunk(header=header(), data=blob[10:])], c1),
        "codec mismatch": (S.FAILED_PRECONDITION, one_chunk(
            fq.get_codec("fp32").encode(torch.randn(d), seed=seed1).to_bytes()), c1),
        "params mismatch": (S.FAILED_PRECONDITION, one_chunk(
            fq.get_codec("eden", bits=3).encode(torch.randn(d), seed=seed1).to_bytes()), c1),
        "shape mismatch": (S.FAILED_PRECONDITION, one_chunk(
            fq.get_codec("eden", bits=2).encode(torch.randn(d + 1), seed=seed1).to_bytes()), c1),
        "seed mismatch": (S.FAILED_PRECONDITION, one_chunk(
            fq.get_codec("eden", bits=2).encode(torch.randn(d), seed=0).to_bytes()), c1),
        "not in cohort": (S.FAILED_PRECONDITION,
                          one_chunk(blob, round_id="cohort", client_id=3), TOKENS["3"]),
        "closed round": (S.FAILED_PRECONDITION, one_chunk(blob, round_id="closed"), c1),
        "unknown round": (S.NOT_FOUND, one_chunk(blob, round_id="nope"), c1),
        "over the cap": (S.RESOURCE_EXHAUSTED, one_chunk(b"", total_bytes=CAP + 1), c1),
        "chunk over 4 MiB": (S.RESOURCE_EXHAUSTED, one_chunk(b"\0" * (4 * 1024 * 1024 + 1),
                                                             total_bytes=CAP), c1),
        "no token": (S.UNAUTHENTICATED, one_chunk(blob), None),
        "unknown token": (S.UNAUTHENTICATED, one_chunk(blob), "not-a-token"),
        "another client's token": (S.PERMISSION_DENIED, one_chunk(blob), TOKENS["2"]),
    }

    honest_results = []

    def honest():
        xs = [torch.randn(1000) for _ in range(n_honest)]
        encs = []
        for i in range(n_honest):
            with client_for(server, 30 + i) as c:
                encs.append(c.encode("honest", 30 + i, xs[i]))
                honest_results.append(c.push("honest", 30 + i, encs[-1], weight=1 + i))
        with client_for(server, 30) as c:
            honest_results.append((c.get_mean("honest", wait_s=30), encs))

    honest_thread = threading.Thread(target=honest)
    honest_thread.start()
    with ThreadPoolExecutor(8) as pool:
        answers = dict(zip(cases, pool.map(lambda c: raw_push(stub, c[1], c[2]),
                                           cases.values()), strict=True))
    honest_thread.join(120)
    for name, (expected, _, _) in cases.items():
        code, details = answers[name]
        assert code == expected, f"{name}: got {code} ({details})"
        assert details, f"{name}: no message"
    assert "weight" in answers["NaN weight"][1]
    assert "shape" in answers["shape mismatch"][1]
    assert "seed" in answers["seed mismatch"][1]
    assert "cohort" in answers["not in cohort"][1]

    # The honest client completed, and no bad push left a trace in the victim round.
    mean, encs = honest_results[-1]
    torch.testing.assert_close(mean, fq.decode_mean(encs, [1 + i for i in range(n_honest)]),
                               rtol=1e-5, atol=1e-6)
    assert not operator.round_status("victim").pushes

    # Duplicates: the same payload again is success for the retrying client; another
    # payload from the same client is ALREADY_EXISTS (PushConflict in the client library).
    with client_for(server, 1) as c:
        first = c.push("victim", 1, good)
        assert not first.already_recorded
        assert c.push("victim", 1, good).already_recorded
        other = c.encode("victim", 1, torch.randn(d))
        with pytest.raises(PushConflict):
            c.push("victim", 1, other)
    code, details = raw_push(stub, one_chunk(other.to_bytes()), c1)
    assert code == S.ALREADY_EXISTS and first.sha256 in details

    # Operator calls: a client token is not enough; bad arguments and reused ids are refused.
    with client_for(server, 1) as c, pytest.raises(grpc.RpcError) as err:
        c.open_round("by-client", "eden", shape=[4])
    assert err.value.code() == S.PERMISSION_DENIED
    for kwargs, message in ((dict(codec="nope", shape=[4]), "unknown codec"),
                            (dict(codec="eden", shape=[]), "shape"),
                            (dict(codec="eden", params={"bits": 9}, shape=[4]), "bits"),
                            (dict(codec="eden", shape=[4], deadline_s=-1.0), "deadline")):
        with pytest.raises(grpc.RpcError) as err:
            operator.open_round("bad-args", **kwargs)
        assert err.value.code() == S.INVALID_ARGUMENT and message in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        operator.open_round("victim", "eden", shape=[4])
    assert err.value.code() == S.ALREADY_EXISTS


_DEFINED = {S.OK, S.INVALID_ARGUMENT, S.FAILED_PRECONDITION, S.NOT_FOUND, S.ALREADY_EXISTS,
            S.RESOURCE_EXHAUSTED, S.UNAUTHENTICATED, S.PERMISSION_DENIED}


@st.composite
def push_requests(draw, valid: bytes):
    """Chunks of a Push with fuzzed header fields, payload bytes and chunking."""
    if draw(st.booleans()):
        payload = bytearray(valid)
        for _ in range(draw(st.integers(1, 8))):
            payload[draw(st.integers(0, len(payload) - 1))] = draw(st.integers(0, 255))
        payload = bytes(payload[: draw(st.integers(0, len(payload)))])
    else:
        payload = draw(st.binary(max_size=300))
    client_id = draw(st.integers(0, 39) | st.integers(0, 2**64 - 1))
    fields = dict(
        round_id=draw(st.sampled_from(["fuzz", "missing", ""]) | st.text(max_size=20)),
        client_id=client_id,
        weight=draw(st.floats(allow_nan=True, allow_infinity=True) | st.just(1.0)),
        total_bytes=draw(st.just(len(payload)) | st.integers(0, 2**64 - 1)))
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    chunks = [pb.PushChunk(header=header(**fields), data=pieces[0])]
    chunks += [pb.PushChunk(data=p) for p in pieces[1:]]
    if draw(st.booleans()) and len(chunks) > 1:
        chunks[-1].header.CopyFrom(header(**fields))  # a header where none belongs
    if draw(st.integers(0, 9)) == 0:
        chunks[0].ClearField("header")
    token = TOKENS.get(str(client_id)) if draw(st.integers(0, 9)) else None
    return chunks, token, payload, fields


def test_fuzz_push_fields_and_chunks(server, operator, stub):
    d = 200
    operator.open_round("fuzz", "eden", {"bits": 2}, round_seed=2, shape=[d])
    valid = operator.encode("fuzz", 0, torch.randn(d)).to_bytes()

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(push_requests(valid))
    def check(request):
        chunks, token, payload, fields = request
        code, details = raw_push(stub, chunks, token)
        assert code in _DEFINED, f"{code}: {details}"
        if code == S.OK:  # only a payload the round accepts may be acknowledged
            enc = fq.Encoded.from_bytes(payload)
            assert enc.shape == (d,) and fields["round_id"] == "fuzz"
        well_formed = (token is not None and chunks[0].HasField("header")
                       and fields["round_id"] == "fuzz" and fields["weight"] == 1.0
                       and fields["total_bytes"] == len(payload)
                       and not any(c.HasField("header") for c in chunks[1:]))
        if well_formed and code not in (S.OK, S.ALREADY_EXISTS):
            try:
                fq.Encoded.from_bytes(payload)
            except fq.WireError:
                assert code == S.INVALID_ARGUMENT, f"bad bytes gave {code}: {details}"

    check()
    # The server still serves: an honest push is acknowledged.
    with client_for(server, 39) as c:
        assert c.push_tensor("fuzz", 39, torch.randn(d)).nbytes > 0


def test_a_stalled_push_is_cancelled_and_frees_its_worker(server, operator, stub):
    operator.open_round("stall", "eden", {"bits": 2}, round_seed=4, shape=[64])
    blob = operator.encode("stall", 7, torch.randn(64)).to_bytes()
    release = threading.Event()

    def stalled():  # the header and half the bytes, then nothing
        yield pb.PushChunk(header=header("stall", 7, total_bytes=len(blob)),
                           data=blob[: len(blob) // 2])
        release.wait(60)

    try:
        metadata = (("authorization", f"Bearer {TOKENS['7']}"),)
        with pytest.raises(grpc.RpcError) as err:
            stub.Push(stalled(), timeout=60, metadata=metadata)
        assert err.value.code() == S.CANCELLED
    finally:
        release.set()
    with client_for(server, 7) as c:  # the client may push again, and nothing was recorded
        assert not c.push("stall", 7, blob).already_recorded
