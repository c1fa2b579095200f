"""``fedquant soak``: the aggregation server under many clients, a few of them hostile.

A real ``fedquant serve`` subprocess on 127.0.0.1 (norm screening on: ``--norm-median-multiple
10``) takes one EDEN round from `clients` clients arriving in `waves` waves; `bad_fraction`
of them misbehave, one kind each in turn: a NaN scale, a 1e30 scale, weight 1e308, another
round's seed, random bytes, an over-size declaration, and a stream that stalls half-way.
Every honest client pushes and then waits for the mean (``push --wait-mean``); the operator
closes the round after the last wave. Reported: acknowledged and refused pushes (by status),
p50/p99 push latency of the honest clients, waiters served, the server's peak RSS
(``VmHWM``) next to its RSS before the first push (the baseline), wall time, and the
largest error of the server's mean against a local ``fq.decode_mean`` of the honest
payloads (0 up to float rounding: the hostile ones left no trace). The clients are
coroutines over a few ``grpc.aio`` channels, so the load generator itself needs no thread
per client.

    fedquant soak                        # 1000 clients, 10 waves, 5% hostile, d = 2^16
    fedquant soak --clients 200 --dim 4096 --out results/soak-small

Writes ``<out>/soak.json``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import pathlib
import signal
import subprocess
import tempfile
import time
from collections import Counter
from typing import Annotated

import grpc
import numpy as np
import torch
import typer

import fedquant as fq
from fedquant._proto import aggregator_pb2 as pb
from fedquant._proto import aggregator_pb2_grpc as pb_grpc
from fedquant._proto import update_pb2
from fedquant.simulations.common import rss_kib, start_local_server

BAD_KINDS = ("nan_scale", "huge_scale", "heavy_weight", "wrong_seed", "garbage", "oversize",
             "stall")
CHANNELS = 8
ROUND = "soak"


def _hostile(kind: str, blob: bytes, rng: np.random.Generator) -> tuple[bytes, float, int]:
    """(payload, weight, declared total_bytes) of a misbehaving client."""
    msg = update_pb2.EncodedUpdate()
    msg.ParseFromString(blob)
    weight, total = 1.0, None
    if kind == "nan_scale":
        msg.scales[0] = float("nan")
    elif kind == "huge_scale":
        for i in range(len(msg.scales)):
            msg.scales[i] = 1e30
    elif kind == "heavy_weight":
        weight = 1e308
    elif kind == "wrong_seed":
        msg.seed ^= 0x5EED
    elif kind == "garbage":
        return rng.bytes(len(blob)), weight, len(blob)
    elif kind == "oversize":
        total = 2**40
    payload = msg.SerializeToString()
    return payload, weight, len(payload) if total is None else total


async def _push(stub, client_id: int, payload: bytes, weight: float, total: int,
                stall: bool = False) -> tuple[str, float]:
    """(status name, seconds) of one push."""
    header = pb.PushHeader(round_id=ROUND, client_id=client_id, weight=weight,
                           total_bytes=total)

    async def chunks():
        half = len(payload) // 2 if stall else len(payload)
        yield pb.PushChunk(header=header, data=payload[:half])
        if stall:
            await asyncio.sleep(3600)  # the server cancels it after --idle-timeout-s

    started = time.perf_counter()
    try:
        await stub.Push(chunks(), timeout=120)
        status = "OK"
    except grpc.aio.AioRpcError as e:
        status = e.code().name
    return status, time.perf_counter() - started


async def _mean(stub, timeout_s: float) -> torch.Tensor | str:
    parts, shape = [], None
    try:
        async for chunk in stub.GetMean(pb.GetMeanRequest(round_id=ROUND, wait_s=timeout_s),
                                        timeout=timeout_s + 30):
            shape = shape or tuple(chunk.shape)
            parts.append(chunk.data)
    except grpc.aio.AioRpcError as e:
        return e.code().name
    return torch.from_numpy(np.frombuffer(b"".join(parts), dtype="<f4").copy()).reshape(shape)


async def _soak(target: str, admin: str, clients: int, waves: int, bad_fraction: float,
                dim: int, bits: int, seed: int, log, pid: int) -> dict:
    rng = np.random.default_rng(seed)
    codec = fq.get_codec("eden", bits=bits)
    n_bad = round(bad_fraction * clients)
    bad_ids = set(rng.choice(clients, n_bad, replace=False).tolist()) if n_bad else set()
    kinds = {cid: BAD_KINDS[i % len(BAD_KINDS)] for i, cid in enumerate(sorted(bad_ids))}
    log(f"encoding {clients} updates of d={dim}")
    blobs, honest = {}, []
    for cid in range(clients):
        x = fq.random.normals(seed + cid, fq.random.Purpose.PRIVATE, dim)
        enc = codec.encode(x, seed=fq.random.derive_seed(seed, cid))
        blobs[cid] = enc.to_bytes()
        if cid not in bad_ids:
            honest.append(enc)
    channels = [grpc.aio.insecure_channel(target) for _ in range(CHANNELS)]
    stubs = [pb_grpc.AggregatorStub(c) for c in channels]
    admin_md = (("authorization", f"Bearer {admin}"),)
    await stubs[0].OpenRound(pb.OpenRoundRequest(
        round_id=ROUND, codec=pb.CodecSpec(name="eden", params=codec.wire_params()),
        round_seed=seed, shape=[dim], expected_count=clients, quorum=clients),
        metadata=admin_md, timeout=60)
    idle_rss = rss_kib(pid, "VmRSS") / 1024  # the baseline: the server before the first push

    outcomes: dict[int, str] = {}
    latencies: list[float] = []
    waiters: list[asyncio.Task] = []

    async def one(cid: int) -> None:
        stub = stubs[cid % CHANNELS]
        if cid in bad_ids:
            payload, weight, total = _hostile(kinds[cid], blobs[cid], rng)
            outcomes[cid], _ = await _push(stub, cid, payload, weight, total,
                                           stall=kinds[cid] == "stall")
            return
        outcomes[cid], seconds = await _push(stub, cid, blobs[cid], 1.0, len(blobs[cid]))
        latencies.append(seconds)
        if outcomes[cid] == "OK":  # push --wait-mean: wait for the round's mean
            waiters.append(asyncio.ensure_future(_mean(stub, 300)))

    started = time.perf_counter()
    per_wave = math.ceil(clients / waves)
    for w in range(waves):
        ids = range(w * per_wave, min(clients, (w + 1) * per_wave))
        await asyncio.gather(*(one(cid) for cid in ids))
        log(f"wave {w + 1}/{waves}: {sum(s == 'OK' for s in outcomes.values())} acked so far")
    await stubs[0].CloseRound(pb.CloseRoundRequest(round_id=ROUND), metadata=admin_md,
                              timeout=120)
    means = await asyncio.gather(*waiters)
    wall = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    got = [m for m in means if isinstance(m, torch.Tensor)]
    expected = fq.decode_mean(honest)
    error = max((float((m - expected).abs().max()) for m in got), default=float("nan"))
    by_status = Counter(outcomes[c] for c in bad_ids)
    lat = np.array(latencies) * 1e3
    return {
        "clients": clients, "waves": waves, "dim": dim, "bits": bits,
        "misbehaving": len(bad_ids),
        "acked_pushes": sum(s == "OK" for s in outcomes.values()),
        "acked_honest": sum(outcomes[c] == "OK" for c in range(clients) if c not in bad_ids),
        "acked_misbehaving": sum(outcomes[c] == "OK" for c in bad_ids),
        "rejected_pushes": sum(s != "OK" for s in outcomes.values()),
        "rejected_by_status": dict(sorted(by_status.items())),
        "rejected_by_kind": dict(sorted(Counter(f"{kinds[c]}:{outcomes[c]}"
                                                for c in bad_ids).items())),
        "push_p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "push_p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "mean_waiters": len(waiters), "mean_waiters_served": len(got),
        "max_abs_error_vs_decode_mean": error,
        "mean_norm": float(torch.linalg.vector_norm(expected)),
        "wall_s": wall, "server_idle_rss_mib": idle_rss,
    }


def run(clients: int = 1000, waves: int = 10, bad_fraction: float = 0.05, dim: int = 2**16,
        bits: int = 2, seed: int = 7, idle_timeout_s: float = 2.0, log=print) -> dict:
    """Start a server, soak it, stop it by PID; returns the figures."""
    if clients < 1 or waves < 1 or not 0 <= bad_fraction < 1 or dim < 1:
        raise ValueError("clients, waves and dim must be >= 1, bad_fraction in [0, 1)")
    with tempfile.TemporaryDirectory() as tmp:
        data = pathlib.Path(tmp) / "data"
        data.mkdir(mode=0o700)
        proc, port = start_local_server(data, "--norm-median-multiple", "10",
                                        "--idle-timeout-s", str(idle_timeout_s),
                                        log_level="error")
        try:
            target = f"127.0.0.1:{port}"
            admin = (data / "admin.token").read_text().strip()
            row = asyncio.run(_soak(target, admin, clients, waves, bad_fraction, dim, bits,
                                    seed, log, proc.pid))
            row["server_peak_rss_mib"] = rss_kib(proc.pid) / 1024
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
    return row


def register(app: typer.Typer) -> None:
    @app.command()
    def soak(
        clients: Annotated[int, typer.Option(help="Clients in the round.")] = 1000,
        waves: Annotated[int, typer.Option(help="Waves the clients arrive in.")] = 10,
        bad_fraction: Annotated[float, typer.Option(help="Share of hostile clients.")] = 0.05,
        dim: Annotated[int, typer.Option(help="Coordinates per update.")] = 2**16,
        bits: Annotated[int, typer.Option(help="EDEN bits per coordinate.")] = 2,
        seed: Annotated[int, typer.Option(help="Seed of data and hostile choices.")] = 7,
        out: Annotated[pathlib.Path, typer.Option(help="Output folder.")]
        = pathlib.Path("results/soak"),
    ) -> None:
        """Soak the aggregation server: many clients in waves, a few hostile ones."""
        try:
            row = run(clients, waves, bad_fraction, dim, bits, seed)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(row, indent=2) + "\n")
        for key, value in row.items():
            print(f"{key:>30}: {value:.4g}" if isinstance(value, float) else
                  f"{key:>30}: {value}")
        print(f"written: {out / 'soak.json'}")


__all__ = ["BAD_KINDS", "register", "run"]
