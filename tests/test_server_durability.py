"""kill -9 of the server during a round and a restart lose no acknowledged push and count
none twice: the resumed round's mean equals fq.decode_mean of every client's payload.
(That a closed round keeps its mean across a restart is checked in-process in
test_server_units.py.)"""

from __future__ import annotations

import threading
import time

import grpc
import torch
from helpers_server import ServerProcess

import fedquant as fq
from clients.grpc_client import AggregatorClient
from fedquant._proto import aggregator_pb2 as pb


def test_kill_9_during_a_round_then_restart(tmp_path):
    d, n = 4096, 12
    weights = [1.0 + i for i in range(n)]
    server = ServerProcess(tmp_path, "--insecure")
    try:
        with AggregatorClient(server.target, insecure=True) as c:
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

        threads = [threading.Thread(target=push, args=(i,)) for i in (6, 7, 8)]
        for t in threads:
            t.start()
        time.sleep(0.02)
        server.kill()
        for t in threads:
            t.join(60)
    finally:
        server.kill()

    server = ServerProcess(tmp_path, "--insecure")
    try:
        with AggregatorClient(server.target, insecure=True) as c:
            status = c.round_status("durable")
            recorded = [p.client_id for p in status.pushes]
            assert len(recorded) == len(set(recorded))  # none twice
            assert acked <= set(recorded)  # none lost
            assert status.state == pb.OPEN
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
