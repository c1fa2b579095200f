"""``fedquant bench server``: throughput, latency and memory of the aggregation server.

N concurrent clients push d = 2^20 EDEN updates at 2 bits (issue 4) over loopback to a real
server subprocess. Reported per client count: updates/s, MB/s, p50/p99 push latency and the
server's peak RSS (``VmHWM`` of /proc/<pid>/status); and, in the same run, the baseline: the
codec's own decode throughput on the same payloads (``from_bytes`` + ``decode``, one after
another in this process). Targets: server updates/s >= 0.5 x the codec's, and peak RSS
flat in N (the run is repeated at two client counts).

    fedquant bench server --clients 100   # or: python -m fedquant.simulations.bench_server
    fedquant bench server --config simulations/configs/bench_server.toml

Writes ``results/bench_server/``: bench_server.csv, bench_server.json, bench_server.png and
report.md.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import tempfile
import threading
import time
import tomllib
from dataclasses import asdict, dataclass, fields
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import fedquant as fq
from fedquant.clients.grpc_client import AggregatorClient
from fedquant.server.cli import reuse_freed_memory
from fedquant.simulations.common import rss_kib, start_local_server


@dataclass(frozen=True)
class BenchConfig:
    """Parameters of the benchmark (keys of the TOML file's [bench] table)."""

    clients: int = 100
    small_clients: int = 10  # the second client count, to show RSS does not grow with N
    dim: int = 2**20
    bits: int = 2
    round_seed: int = 1
    decode_slots: int = 0  # 0: the server's default
    out: str = "results/bench_server"

    @classmethod
    def load(cls, path: pathlib.Path | None, **overrides) -> BenchConfig:
        table = {}
        if path is not None:
            data = tomllib.loads(path.read_text())
            if set(data) - {"bench"}:
                raise ValueError(f"{path}: unknown table(s) {sorted(set(data) - {'bench'})}; "
                                 "allowed: ['bench']")
            table = data.get("bench", {})
        allowed = [f.name for f in fields(cls)]
        unknown = set(table) - set(allowed)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {allowed}")
        cfg = cls(**{**table, **{k: v for k, v in overrides.items() if v is not None}})
        if cfg.clients < 1 or not 1 <= cfg.small_clients <= cfg.clients:
            raise ValueError("clients must be >= 1 and small_clients in [1, clients]")
        if cfg.dim < 1 or not 1 <= cfg.bits <= 8:
            raise ValueError("dim must be >= 1 and bits in 1..8")
        return cfg


QUICK = {"clients": 8, "small_clients": 2, "dim": 2**14}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (fields 14 and 15 of /proc/<pid>/stat)."""
    fields_ = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def codec_decode_rate(payloads: list[bytes]) -> float:
    """Updates per second of parse + the codec's decode alone (no sum), one after another,
    in-process: the baseline the server's whole path (gRPC, log, sum) is compared with.
    It runs with the server's malloc settings (``reuse_freed_memory``), which speed decoding
    up by as much as they speed the server up: the ratio compares like with like."""
    reuse_freed_memory()
    enc = fq.Encoded.from_bytes(payloads[0])
    codec = fq.codecs.codec_for(enc)
    codec.decode(enc)  # warm-up: compiles the kernels
    started = time.perf_counter()
    for blob in payloads:
        codec.decode(fq.Encoded.from_bytes(blob))
    return len(payloads) / (time.perf_counter() - started)


def push_round(target: str, round_id: str, payloads: list[bytes],
               progress: Progress | None = None) -> dict:
    """All clients push at once (one thread and channel each); returns timings."""
    n = len(payloads)
    latencies = [0.0] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n + 1)
    task = progress.add_task(f"{n} clients push", total=n) if progress else None

    def client(i: int) -> None:
        with AggregatorClient(target, insecure=True) as c:
            c.round_status(round_id)  # connect before the clock starts
            barrier.wait()
            t0 = time.perf_counter()
            try:
                c.push(round_id, i, payloads[i])
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)
            latencies[i] = time.perf_counter() - t0
            if progress:
                progress.advance(task)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} pushes failed, first: {errors[0]}")
    return {"wall_s": wall, "latencies": latencies}


def run(cfg: BenchConfig, console: Console | None = None) -> list[dict]:
    """Run the benchmark at cfg.small_clients and cfg.clients; write results; return rows."""
    console = console or Console()
    codec_params = {"bits": cfg.bits}
    rows = []
    with Progress(console=console, transient=True) as progress, \
            tempfile.TemporaryDirectory() as tmp:
        task = progress.add_task(f"encode {cfg.clients} x d={cfg.dim}", total=cfg.clients)
        codec = fq.get_codec("eden", **codec_params)
        payloads = []
        for i in range(cfg.clients):
            x = fq.random.normals(i, fq.random.Purpose.PRIVATE, cfg.dim)
            seed = fq.random.derive_seed(cfg.round_seed, i)
            payloads.append(codec.encode(x, seed=seed).to_bytes())
            progress.advance(task)
        for n in sorted({cfg.small_clients, cfg.clients}):
            subset = payloads[:n]
            codec_rate = codec_decode_rate(subset)
            flags = ["--decode-slots", str(cfg.decode_slots)] if cfg.decode_slots else []
            proc, port = start_local_server(pathlib.Path(tmp) / f"n{n}", *flags)
            try:
                target = f"127.0.0.1:{port}"
                # opening rounds needs the admin token the server wrote on first start
                token = (pathlib.Path(tmp) / f"n{n}" / "admin.token").read_text().strip()
                with AggregatorClient(target, insecure=True, token=token) as op:
                    # Warm-up round: the first decode compiles the server's kernels.
                    op.open_round("warmup", "eden", codec_params, round_seed=cfg.round_seed,
                                  shape=[cfg.dim], expected=1)
                    op.push("warmup", 0, subset[0])
                    op.open_round("bench", "eden", codec_params, round_seed=cfg.round_seed,
                                  shape=[cfg.dim], expected=n)
                    rss_idle = rss_kib(proc.pid, "VmRSS")
                    cpu_before = _cpu_seconds(proc.pid)
                    timing = push_round(target, "bench", subset, progress)
                    server_cpu = _cpu_seconds(proc.pid) - cpu_before
                    mean = op.get_mean("bench", wait_s=60)
                peak = rss_kib(proc.pid, "VmHWM")
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            encs = [fq.Encoded.from_bytes(b) for b in subset]
            error = float((mean - fq.decode_mean(encs)).abs().max())
            lat = np.array(timing["latencies"])
            nbytes = sum(len(b) for b in subset)
            rate = n / timing["wall_s"]
            rows.append({
                "clients": n, "dim": cfg.dim, "bits": cfg.bits, "bytes_per_update": nbytes // n,
                "server_updates_per_s": rate, "server_mb_per_s": nbytes / timing["wall_s"] / 1e6,
                "p50_push_ms": 1e3 * float(np.percentile(lat, 50)),
                "p99_push_ms": 1e3 * float(np.percentile(lat, 99)),
                "server_idle_rss_mib": rss_idle / 1024, "server_peak_rss_mib": peak / 1024,
                "server_cpu_ms_per_update": 1e3 * server_cpu / n,
                "codec_decode_ms_per_update": 1e3 / codec_rate,
                "codec_decode_updates_per_s": codec_rate,
                "server_over_codec": rate / codec_rate, "max_abs_error_vs_decode_mean": error,
                "cpus": os.cpu_count()})
    _write(cfg, rows)
    _print(console, rows)
    return rows


def _write(cfg: BenchConfig, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_server.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "bench_server.json").write_text(json.dumps(
        {"config": asdict(cfg), "rows": rows}, indent=2))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [str(r["clients"]) for r in rows]
    xs = np.arange(len(rows))
    ax1.bar(xs - 0.2, [r["server_updates_per_s"] for r in rows], 0.4, label="server")
    ax1.bar(xs + 0.2, [r["codec_decode_updates_per_s"] for r in rows], 0.4,
            label="codec decode")
    ax1.set(xticks=xs, xticklabels=labels, xlabel="clients", ylabel="updates / s")
    ax1.legend()
    ax2.bar(xs, [r["server_peak_rss_mib"] for r in rows], 0.4)
    ax2.set(xticks=xs, xticklabels=labels, xlabel="clients", ylabel="server peak RSS (MiB)")
    fig.suptitle(f"aggregation server, EDEN b={cfg.bits}, d={cfg.dim}")
    fig.tight_layout()
    fig.savefig(out / "bench_server.png", dpi=120)
    plt.close(fig)
    lines = ["# fedquant bench server", "",
             f"EDEN b={cfg.bits}, d={cfg.dim}, concurrent clients over loopback, "
             f"{os.cpu_count()} CPUs. Baseline: the codec's own decode throughput "
             "(parse + decode, sequential, in-process) on the same payloads.", "",
             "| clients | updates/s | MB/s | p50 ms | p99 ms | peak RSS MiB | codec updates/s "
             "| server/codec | server CPU ms/update | codec decode ms/update |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['server_updates_per_s']:.1f} | "
                     f"{r['server_mb_per_s']:.1f} | {r['p50_push_ms']:.0f} | "
                     f"{r['p99_push_ms']:.0f} | {r['server_peak_rss_mib']:.0f} | "
                     f"{r['codec_decode_updates_per_s']:.1f} | {r['server_over_codec']:.2f} | "
                     f"{r['server_cpu_ms_per_update']:.1f} | "
                     f"{r['codec_decode_ms_per_update']:.1f} |")
    lines += ["", "Targets: server/codec >= 0.5; peak RSS flat in the number of clients.",
              "The clients run on the same machine and share its cores with the server; "
              "server CPU ms/update (the server process's CPU time during the pushes, per "
              "update) against codec decode ms/update separates the server's own cost from "
              "that sharing.", ""]
    (out / "report.md").write_text("\n".join(lines))


def _print(console: Console, rows: list[dict]) -> None:
    table = Table(title="fedquant bench server")
    for name in ("clients", "updates/s", "MB/s", "p50 ms", "p99 ms", "peak RSS MiB",
                 "codec updates/s", "server/codec"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(str(r["clients"]), f"{r['server_updates_per_s']:.1f}",
                      f"{r['server_mb_per_s']:.1f}", f"{r['p50_push_ms']:.0f}",
                      f"{r['p99_push_ms']:.0f}", f"{r['server_peak_rss_mib']:.0f}",
                      f"{r['codec_decode_updates_per_s']:.1f}",
                      f"{r['server_over_codec']:.2f}")
    console.print(table)


def bench_server(
    clients: Annotated[int | None, typer.Option(help="Concurrent clients (default 100).")]
    = None,
    small_clients: Annotated[int | None, typer.Option(
        help="Second, smaller client count (RSS must not grow with N).")] = None,
    dim: Annotated[int | None, typer.Option(help="Update size d (default 2^20).")] = None,
    bits: Annotated[int | None, typer.Option(help="EDEN bits (default 2).")] = None,
    config: Annotated[pathlib.Path | None, typer.Option(
        help="TOML with a \\[bench] table, e.g. simulations/configs/bench_server.toml.")]
    = None,
    out: Annotated[str | None, typer.Option(help="Output directory.")] = None,
    quick: Annotated[bool, typer.Option(help="A run of seconds (8 clients, d=2^14).")]
    = False,
) -> None:
    """Benchmark the gRPC aggregation server against the codec's own decode throughput."""
    overrides = dict(QUICK) if quick else {}
    overrides.update({k: v for k, v in dict(clients=clients, small_clients=small_clients,
                                            dim=dim, bits=bits, out=out).items()
                      if v is not None})
    if clients is not None and small_clients is None:
        overrides["small_clients"] = max(1, min(clients, clients // 10))
    try:
        cfg = BenchConfig.load(config, **overrides)
    except (ValueError, TypeError, OSError, tomllib.TOMLDecodeError) as e:
        raise typer.BadParameter(str(e)) from None
    run(cfg)


def register_bench(bench_app: typer.Typer) -> None:
    """Add ``server`` to the ``fedquant bench`` command group."""
    bench_app.command("server")(bench_server)


if __name__ == "__main__":
    typer.run(bench_server)
