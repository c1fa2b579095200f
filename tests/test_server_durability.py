"""kill -9 of the server during a round and a restart lose no acknowledged push and count
none twice: the resumed round's mean equals fq.decode_mean of every client's payload.
(That a closed round keeps its mean across a restart is checked in-process in
test_server_units.py.)"""

from __future__ import annotations

import contextlib
import threading
import time

import grpc
import torch
from helpers_server import ServerProcess

import fedquant as fq
from fedquant._proto import aggregator_pb2 as pb
from fedquant._proto import aggregator_pb2_grpc as pb_grpc
from fedquant.clients.grpc_client import AggregatorClient


def test_kill_9_during_a_round_then_restart(tmp_path):
    d, n = 4096, 12
    weights = [1.0 + i for i in range(n)]
    server = ServerProcess(tmp_path, "--insecure")
    try:
        with AggregatorClient(server.target, insecure=True, token=server.admin_token) as c:
            c.open_round("durable", "eden", {"bits": 2}, round_seed=7, shape=[d], expected=n)
            encs = [c.encode("durable", i, torch.randn(d)) for i in range(n)]
            for i in range(6):
                assert not c.push("durable", i, encs[i], weights[i]).already_recorded
        acked = set(range(6))

        # Clients 6..8 push while the server is killed: some may be acknowledged, some not.
        def push(i):
            with AggregatorClient(server.target, insecure=True, retries=0) as own:
                try:
                    own.push("durable", i, encs[i], weights[i])
                    acked.add(i)
                except grpc.RpcError:
                    pass

        # Client 9's push is certainly in flight: half its bytes are sent, then it waits.
        blob, sent, release = encs[9].to_bytes(), threading.Event(), threading.Event()

        def stalled_chunks():
            yield pb.PushChunk(header=pb.PushHeader(round_id="durable", client_id=9,
                                                    weight=weights[9], total_bytes=len(blob)),
                               data=blob[: len(blob) // 2])
            sent.set()
            release.wait(30)

        def stalled_push():
            with grpc.insecure_channel(server.target) as channel:
                with contextlib.suppress(grpc.RpcError):
                    pb_grpc.AggregatorStub(channel).Push(stalled_chunks(), timeout=30)

        threads = [threading.Thread(target=push, args=(i,)) for i in (6, 7, 8)]
        threads.append(threading.Thread(target=stalled_push))
        for t in threads:
            t.start()
        assert sent.wait(30)
        time.sleep(0.1)  # let the chunk reach the server
        server.kill()
        release.set()
        for t in threads:
            t.join(60)
    finally:
        server.kill()

    server = ServerProcess(tmp_path, "--insecure")
    try:
        with AggregatorClient(server.target, insecure=True, token=server.admin_token) as c:
            status = c.round_status("durable")
            recorded = [p.client_id for p in status.pushes]
            assert len(recorded) == len(set(recorded))  # none twice
            assert acked <= set(recorded)  # none lost
            assert status.state == pb.OPEN
            assert 9 not in recorded  # never acknowledged, never counted
            for i in (6, 7, 8):  # retried: a push recorded before the kill counts as success
                result = c.push("durable", i, encs[i], weights[i])
                assert result.already_recorded == (i in recorded)
            for i in range(9, n):
                c.push("durable", i, encs[i], weights[i])
            mean = c.get_mean("durable", wait_s=30)
            expected = fq.decode_mean(encs, weights)
            torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-6)
    finally:
        server.kill()
