"""The attacks of a client holding one valid token, each against a real server subprocess on
127.0.0.1 (ephemeral port, stopped by PID): poisoning the mean (NaN values, weight overflow,
a 1e30 scale), stalling the server (idle streams, clients waiting for the mean),
reading what is not theirs, and a tampered log; plus the start-up refusals."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from helpers_server import ROOT, ServerProcess

import fedquant as fq
from fedquant._proto import aggregator_pb2 as pb
from fedquant._proto import aggregator_pb2_grpc as pb_grpc
from fedquant._proto import update_pb2
from fedquant.clients.grpc_client import AggregatorClient
from fedquant.server.aggregator import ServerConfig, start_server

OPERATOR = "operator-token-hardening"
TOKENS = {"operator": OPERATOR, **{str(i): f"client-token-{i:04d}" for i in range(60)}}
S = grpc.StatusCode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("hardening")
    (data / "tokens.json").write_text(json.dumps(TOKENS))
    proc = ServerProcess(data, "--insecure", "--tokens", str(data / "tokens.json"),
                         "--norm-median-multiple", "10")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def operator(server):
    with AggregatorClient(server.target, insecure=True, token=OPERATOR) as c:
        yield c


def client(server, cid: int, **kwargs) -> AggregatorClient:
    return AggregatorClient(server.target, insecure=True, token=TOKENS[str(cid)], retries=0,
                            **kwargs)


def _code(call) -> tuple[S, str]:
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return S.OK, ""


def _mutated(enc: fq.Encoded, change) -> bytes:
    msg = update_pb2.EncodedUpdate()
    msg.ParseFromString(enc.to_bytes())
    change(msg)
    return msg.SerializeToString()


# ---- poisoning ------------------------------------------------------------------------
def test_nan_values_and_overflowing_weights_leave_the_mean_finite(server, operator):
    d = 500
    operator.open_round("nan", "fp32", round_seed=1, shape=[d], expected=3)
    operator.open_round("weights", "eden", {"bits": 2}, round_seed=2, shape=[d], expected=3)
    xs = [torch.randn(d) for _ in range(3)]
    with client(server, 50) as bad:
        enc = bad.encode("nan", 50, torch.randn(d))

        def nan_first(msg):
            msg.sections[0].data = b"\x00\x00\xc0\x7f" + msg.sections[0].data[4:]
        code, details = _code(lambda: bad.push("nan", 50, _mutated(enc, nan_first)))
        assert code == S.INVALID_ARGUMENT and "NaN or Inf" in details
        for cid in (50, 51):  # two pushes of weight 1e308 would make the total weight inf
            with client(server, cid) as c:
                heavy = c.encode("weights", cid, torch.randn(d))
                code, details = _code(lambda c=c, h=heavy, i=cid: c.push("weights", i, h,
                                                                          weight=1e308))
                assert code == S.INVALID_ARGUMENT and "weight" in details
    encs = []
    for i in range(3):
        with client(server, i) as c:
            c.push("nan", i, c.encode("nan", i, xs[i]))
            encs.append(c.encode("weights", i, xs[i]))
            c.push("weights", i, encs[-1], weight=1.0 + i)
    with client(server, 0) as c:
        mean = c.get_mean("nan", wait_s=20)
        assert torch.isfinite(mean).all()
        torch.testing.assert_close(mean, sum(xs) / 3)
        mean = c.get_mean("weights", wait_s=20)
        torch.testing.assert_close(mean, fq.decode_mean(encs, [1.0, 2.0, 3.0]),
                                   rtol=1e-5, atol=1e-6)


def test_a_1e30_scale_is_screened_out_whenever_it_arrives(server, operator):
    """Attacker 40 pushes first (no median yet: accepted, then taken out at close);
    attacker 41 pushes after three honest clients (refused at once). The mean is the honest
    clients' decode_mean, and both attackers are named with their reason."""
    d = 1000
    operator.open_round("scale", "eden", {"bits": 2}, round_seed=3, shape=[d], expected=5)

    def huge(msg):
        for i in range(len(msg.scales)):
            msg.scales[i] = 1e30
    with client(server, 40) as bad:
        first = _mutated(bad.encode("scale", 40, torch.randn(d)), huge)
        assert not bad.push("scale", 40, first).already_recorded  # durable, not yet judged
    honest = []
    for i in range(4):
        with client(server, 10 + i) as c:
            honest.append(c.encode("scale", 10 + i, torch.randn(d)))
            c.push("scale", 10 + i, honest[-1])
        if i == 2:
            with client(server, 41) as bad:
                late = _mutated(bad.encode("scale", 41, torch.randn(d)), huge)
                code, details = _code(lambda b=bad, p=late: b.push("scale", 41, p))
                assert code == S.FAILED_PRECONDITION, details
                assert "norm" in details and "median" in details
    with client(server, 10) as c:
        mean = c.get_mean("scale", wait_s=20)
    assert torch.isfinite(mean).all()
    torch.testing.assert_close(mean, fq.decode_mean(honest), rtol=1e-5, atol=1e-6)
    events = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    named = {(e.get("client"), e.get("event")) for e in events
             if "screened_out" in e.get("event", "")}
    assert (40, "push_screened_out_at_close") in named
    assert (41, "push_screened_out") in named
    # the round's record names both, with their reasons (RoundStatus.rejected)
    record = {r.client_id: r.reason for r in operator.round_status("scale").rejected}
    assert sorted(record) == [40, 41] and all("norm" in why for why in record.values())


# ---- stalls ---------------------------------------------------------------------------
def test_forty_idle_streams_of_one_token_do_not_delay_an_honest_push(server, operator):
    d = 256
    operator.open_round("idle", "eden", {"bits": 2}, round_seed=4, shape=[d], expected=2)
    release = threading.Event()

    def idle():  # opens the stream, never sends a chunk
        release.wait(30)
        yield from ()

    metadata = (("authorization", f"Bearer {TOKENS['1']}"),)
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.AggregatorStub(channel)
    calls = [stub.Push.future(idle(), timeout=30, metadata=metadata) for _ in range(40)]
    try:
        time.sleep(0.5)  # let them all reach the server
        with client(server, 2) as c:
            enc = c.encode("idle", 2, torch.randn(d))
            started = time.monotonic()
            c.push("idle", 2, enc)
            assert time.monotonic() - started < 1.0
        refused = [f for f in calls if f.done() and f.code() == S.RESOURCE_EXHAUSTED]
        assert len(refused) >= 36, "the per-token stream limit did not apply"
    finally:
        release.set()
        for f in calls:
            f.cancel()
        channel.close()


def test_fifty_staggered_clients_that_push_then_wait_all_get_the_mean(tmp_path):
    """Each client pushes, then waits for the mean (push --wait-mean): waiting holds no
    server thread, so the late pushes that complete the quorum are still served."""
    n, d = 50, 512
    proc = ServerProcess(tmp_path, "--insecure", "--workers", "4", "--decode-slots", "2")
    try:
        with AggregatorClient(proc.target, insecure=True, token=proc.admin_token) as op:
            op.open_round("wait", "eden", {"bits": 2}, round_seed=5, shape=[d], expected=n)
            encs = [op.encode("wait", i, torch.randn(d)) for i in range(n)]
        means: dict[int, torch.Tensor] = {}
        errors: list[BaseException] = []

        def push_then_wait(i: int) -> None:
            time.sleep(0.02 * i)
            try:
                with AggregatorClient(proc.target, insecure=True, timeout_s=30) as c:
                    c.push("wait", i, encs[i])
                    means[i] = c.get_mean("wait", wait_s=25)
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        threads = [threading.Thread(target=push_then_wait, args=(i,)) for i in range(n)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[0]
        assert len(means) == n and time.monotonic() - started < 30
        expected = fq.decode_mean(encs)
        for mean in means.values():
            torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-6)
    finally:
        proc.stop()


# ---- authorization --------------------------------------------------------------------
def test_a_client_token_reads_only_its_rounds_and_its_own_push(server, operator):
    d = 64
    operator.open_round("mine", "eden", {"bits": 2}, round_seed=6, shape=[d], cohort=[1, 2])
    operator.open_round("theirs", "eden", {"bits": 2}, round_seed=7, shape=[d], cohort=[3])
    for cid in (1, 2):
        with client(server, cid) as c:
            c.push_tensor("mine", cid, torch.randn(d))
    with client(server, 3) as outsider:
        assert _code(lambda: outsider.round_status("mine"))[0] == S.PERMISSION_DENIED
        assert _code(lambda: outsider.get_mean("mine"))[0] == S.PERMISSION_DENIED
        for call in (lambda: outsider.open_round("x", "eden", shape=[4]),
                     lambda: outsider.close_round("theirs")):
            code, details = _code(call)
            assert code == S.PERMISSION_DENIED and "admin" in details
    with client(server, 1) as member:
        status = member.round_status("mine")
        assert [p.client_id for p in status.pushes] == [1]  # not client 2's id or digest
        assert member.get_mean("mine", wait_s=10).shape == (d,)
    assert sorted(p.client_id for p in operator.round_status("mine").pushes) == [1, 2]


def test_admin_operations_need_the_admin_token_even_without_a_tokens_file(tmp_path):
    proc = ServerProcess(tmp_path, "--insecure")
    try:
        with AggregatorClient(proc.target, insecure=True, retries=0) as anonymous:
            code, details = _code(lambda: anonymous.open_round("r", "eden", shape=[4]))
            assert code == S.PERMISSION_DENIED and "admin" in details
        with AggregatorClient(proc.target, insecure=True, token="wrong-token-123",
                              retries=0) as wrong:
            assert _code(lambda: wrong.open_round("r", "eden", shape=[4]))[0] == (
                S.UNAUTHENTICATED)
        with AggregatorClient(proc.target, insecure=True, token=proc.admin_token) as admin:
            admin.open_round("r", "eden", shape=[4], expected=1)
        token_file = tmp_path / "admin.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    finally:
        proc.stop()


# ---- resources ------------------------------------------------------------------------
def test_round_bounds_are_refused(server, operator):
    for kwargs, word in (({"deadline_s": 1e300}, "deadline_s"),
                         ({"cohort": list(range(100_000))}, "cohort"),
                         ({"expected": 10**6}, "expected")):
        code, details = _code(lambda k=kwargs: operator.open_round("big", "eden", shape=[4],
                                                                   **k))
        assert code == S.INVALID_ARGUMENT and word in details, details


# ---- the log --------------------------------------------------------------------------
def test_tampered_log_rows_are_quarantined_and_a_corrupt_mean_is_not_served(tmp_path):
    d = 128
    proc = ServerProcess(tmp_path, "--insecure")
    token = proc.admin_token
    try:
        with AggregatorClient(proc.target, insecure=True, token=token) as op:
            op.open_round("r1", "eden", {"bits": 2}, round_seed=1, shape=[d], expected=3)
            op.open_round("r2", "eden", {"bits": 2}, round_seed=2, shape=[d], expected=3)
            op.open_round("done", "eden", {"bits": 2}, round_seed=3, shape=[d], expected=1)
            kept = op.encode("r1", 1, torch.randn(d))
            op.push("r1", 1, kept)
            op.push_tensor("r1", 2, torch.randn(d))
            op.push_tensor("r2", 2, torch.randn(d))
            op.push_tensor("done", 7, torch.randn(d))
            op.get_mean("done", wait_s=10)
    finally:
        proc.stop()
    # data directory 0700, log and mean files 0600
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
    for path in (tmp_path / "fedquant.sqlite3", tmp_path / "means" / "done.f32"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    db = sqlite3.connect(tmp_path / "fedquant.sqlite3")
    other = db.execute("SELECT payload, sha256 FROM pushes WHERE round_id = 'r2'").fetchone()
    # r2's payload (with its own valid digest) substituted for r1's client 2
    db.execute("UPDATE pushes SET payload = ?, sha256 = ? WHERE round_id = 'r1' AND "
               "client_id = '2'", other)
    db.commit()
    db.close()
    (tmp_path / "means" / "done.f32").write_bytes(os.urandom(4 * d))

    proc = ServerProcess(tmp_path, "--insecure")
    try:
        assert "round 'r1', client 2" in proc.log()
        with AggregatorClient(proc.target, insecure=True, token=token) as op:
            assert [p.client_id for p in op.round_status("r1").pushes] == [1]
            code, details = _code(lambda: op.get_mean("done"))
            assert code == S.DATA_LOSS and "checksum" in details and "done.f32" in details
            op.close_round("r1")
            torch.testing.assert_close(op.get_mean("r1"), fq.decode(kept))
    finally:
        proc.stop()
    db = sqlite3.connect(tmp_path / "fedquant.sqlite3")
    rows = db.execute("SELECT round_id, client_id, reason FROM quarantine").fetchall()
    db.close()
    assert [(r, c) for r, c, _ in rows] == [("r1", "2")] and "seed" in rows[0][2]


# ---- start-up refusals ----------------------------------------------------------------
def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedquant.server.cli", "--port", "0", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_insecure_on_a_public_address_is_refused_before_binding(tmp_path):
    with pytest.raises(ValueError, match="loopback"):
        start_server(ServerConfig(data_dir=str(tmp_path / "d"), insecure=True,
                                  host="0.0.0.0"))
    assert not (tmp_path / "d").exists()  # refused before opening anything
    run = _serve("--data-dir", str(tmp_path / "d"), "--insecure", "--host", "0.0.0.0")
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "loopback" in run.stderr


def test_a_corrupt_log_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "fedquant.sqlite3").write_bytes(b"not a database" * 100)
    run = _serve("--data-dir", str(tmp_path), "--insecure")
    assert run.returncode == 2
    line = run.stderr.strip()
    assert "\n" not in line and "fedquant.sqlite3" in line and "Traceback" not in line


def test_push_cli_to_a_closed_port_is_one_line_and_honours_retries_0():
    import socket

    import typer
    from typer.testing import CliRunner

    from fedquant.clients import cli as clients_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    app = typer.Typer()
    clients_cli.register(app)
    app.command("noop")(lambda: None)
    started = time.monotonic()
    run = CliRunner().invoke(app, ["push", "--target", f"127.0.0.1:{port}", "--insecure",
                                   "--round", "r", "--client-id", "1", "--random",
                                   "--retries", "0"])
    assert time.monotonic() - started < 5
    assert run.exit_code == 1
    assert run.output.strip() == f"UNAVAILABLE: nothing listening at 127.0.0.1:{port}"


def test_stalled_pushes_cannot_buffer_more_than_the_server_wide_cap(tmp_path):
    """Each push reserves its declared bytes; beyond --max-buffered-bytes the next one is
    told to retry (UNAVAILABLE) before anything is buffered, and stalled ones are cancelled
    by the idle timeout, which frees their reservation."""
    d = 20_000  # fp32: 80 kB per push
    proc = ServerProcess(tmp_path, "--insecure", "--max-buffered-bytes", "200000",
                         "--idle-timeout-s", "1")
    release = threading.Event()
    channel = grpc.insecure_channel(proc.target)
    try:
        with AggregatorClient(proc.target, insecure=True, token=proc.admin_token) as op:
            op.open_round("buf", "fp32", round_seed=1, shape=[d], expected=4)
            blobs = [op.encode("buf", i, torch.randn(d)).to_bytes() for i in range(4)]
        stub = pb_grpc.AggregatorStub(channel)

        def stalled(i):
            yield pb.PushChunk(header=pb.PushHeader(round_id="buf", client_id=i, weight=1.0,
                                                    total_bytes=len(blobs[i])),
                               data=blobs[i][:1000])
            release.wait(20)

        calls = [stub.Push.future(stalled(i), timeout=20) for i in range(3)]
        time.sleep(0.5)
        codes = sorted(f.code().name for f in calls if f.done())
        assert codes == ["UNAVAILABLE"], codes  # 2 x 80 kB reserved, the third refused
        time.sleep(1.5)  # the idle timeout cancels the two stalled pushes
        assert all(f.done() for f in calls)
        with AggregatorClient(proc.target, insecure=True, retries=0) as c:
            assert c.push("buf", 3, blobs[3]).nbytes == len(blobs[3])  # room again
    finally:
        release.set()
        channel.close()
        proc.stop()
