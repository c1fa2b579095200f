"""``fedquant serve``: run the gRPC aggregation server.

    fedquant serve --data-dir data --insecure --port 50051 --rounds rounds.toml
    fedquant serve --data-dir data --tls-cert s.pem --tls-key s.key --tls-client-ca ca.pem \
        --tokens tokens.json --host 0.0.0.0

Plaintext needs ``--insecure`` and the server binds 127.0.0.1 unless ``--host`` says
otherwise. ``--port 0`` binds an ephemeral port; ``--port-file`` receives the bound port once
the server is serving. ``--rounds`` opens the rounds of a TOML file at start-up (rounds
already in the log are kept as they are), e.g.::

    [[round]]
    id = "r1"
    codec = "eden"
    params = { bits = 2 }
    round_seed = 1
    shape = [1048576]
    expected = 10        # or: cohort = [1, 2, 3]
    quorum = 10          # default: the expected count
    deadline_s = 600     # default: no deadline

Also runnable without the other commands: ``python -m server.cli --data-dir data --insecure``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import pathlib
import signal
import tomllib
from typing import Annotated

import torch
import typer
from fedquant.server.aggregator import ServerConfig, start_server
from fedquant.server.metrics import configure_logging
from fedquant.server.rounds import RoundConfig

log = logging.getLogger("fedquant.server")


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks (below 64 MiB) for reuse instead of handing
    them back to the kernel. Every decode allocates a few d-sized arrays; with the default
    settings each is a fresh mmap whose pages fault in again, which cost 3.6 of the 10 ms
    of an EDEN b=2, d=2^20 decode (kernel time; 4.8 ms with this setting). What is kept is
    what the busiest moment used, so peak RSS is unchanged (``decode_slots`` bounds it).
    Returns False where the C library has no ``mallopt`` (non-glibc): nothing changes."""
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, 64 << 20)) and bool(
        mallopt(m_trim_threshold, 256 << 20))


def load_rounds(path: pathlib.Path) -> list[RoundConfig]:
    """The ``[[round]]`` tables of a TOML file; ValueError names the bad key."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"rounds file {path}: {e}") from None
    unknown = set(data) - {"round"}
    if unknown:
        raise ValueError(f"rounds file {path}: unknown key(s) {sorted(unknown)}; allowed: "
                         "['round']")
    rounds = []
    for i, spec in enumerate(data.get("round", [])):
        try:
            rounds.append(RoundConfig.from_dict(spec))
        except ValueError as e:
            raise ValueError(f"rounds file {path}: round[{i}]: {e}") from None
    return rounds


def serve(
    data_dir: Annotated[pathlib.Path, typer.Option(help="Directory of the durable log.")]
    = pathlib.Path("fedquant-data"),
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind; 0 picks a free one.")] = 50051,
    port_file: Annotated[pathlib.Path | None, typer.Option(
        help="Write the bound port here once serving.")] = None,
    insecure: Annotated[bool, typer.Option(help="Serve plaintext (no TLS).")] = False,
    tls_cert: Annotated[pathlib.Path | None, typer.Option(help="Server certificate (PEM).")]
    = None,
    tls_key: Annotated[pathlib.Path | None, typer.Option(help="Server private key (PEM).")]
    = None,
    tls_client_ca: Annotated[pathlib.Path | None, typer.Option(
        help="CA that signs client certificates: enables mutual TLS.")] = None,
    tokens: Annotated[pathlib.Path | None, typer.Option(
        help="JSON file mapping client ids and 'operator' to bearer tokens.")] = None,
    rounds: Annotated[pathlib.Path | None, typer.Option(
        help="TOML file of [[round]] tables to open at start-up.")] = None,
    max_push_bytes: Annotated[int, typer.Option(help="Cap on one push's bytes.")]
    = 256 * 1024 * 1024,
    push_timeout_s: Annotated[float, typer.Option(
        help="Cancel a push still streaming after this many seconds.")] = 600.0,
    workers: Annotated[int, typer.Option(help="gRPC worker threads.")] = 32,
    decode_slots: Annotated[int, typer.Option(help="Concurrent decodes (bounds memory).")]
    = ServerConfig.decode_slots,
    torch_threads: Annotated[int, typer.Option(
        help="Torch intra-op threads; parallelism comes from --decode-slots.")] = 1,
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve Prometheus metrics on this port (same host).")] = None,
    device: Annotated[str, typer.Option(help="Device that decodes and sums: cpu, cuda.")]
    = "cpu",
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the gRPC aggregation server (clients push encoded updates, it averages them)."""
    configure_logging(log_level)
    # Pushes are decoded concurrently on --decode-slots threads; intra-op threads on top of
    # that oversubscribe the cores (a 1M-element add took 15 ms with 2 threads, 3 ms with 1).
    torch.set_num_threads(max(1, torch_threads))
    reuse_freed_memory()
    for name, value in (("workers", workers), ("decode-slots", decode_slots),
                        ("max-push-bytes", max_push_bytes), ("push-timeout-s", push_timeout_s)):
        if value < 1:
            raise typer.BadParameter(f"--{name} must be >= 1, got {value}")
    try:
        cfg = ServerConfig(
            data_dir=str(data_dir), host=host, port=port, insecure=insecure,
            tls_cert=_opt(tls_cert), tls_key=_opt(tls_key), tls_client_ca=_opt(tls_client_ca),
            tokens_file=_opt(tokens), max_push_bytes=max_push_bytes, workers=workers,
            push_timeout_s=push_timeout_s,
            decode_slots=decode_slots, metrics_port=metrics_port, device=device,
            rounds=load_rounds(rounds) if rounds else [])
        running = start_server(cfg)
    except (ValueError, OSError, RuntimeError) as e:
        raise typer.BadParameter(str(e)) from None
    if insecure and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("insecure_remote", extra={"fields": {"host": host}})
    if port_file is not None:
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(str(running.port))
        os.replace(tmp, port_file)  # atomic: a reader never sees a partial number
    log.info("listening", extra={"fields": {
        "host": host, "port": running.port, "tls": not insecure,
        "mtls": tls_client_ca is not None, "tokens": tokens is not None, "pid": os.getpid()}})
    print(json.dumps({"port": running.port}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: running.stop())
    try:
        running.wait()
    except KeyboardInterrupt:
        running.stop()


def _opt(path: pathlib.Path | None) -> str | None:
    return None if path is None else str(path)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


if __name__ == "__main__":
    typer.run(serve)
