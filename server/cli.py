"""``fedquant serve``: run the gRPC aggregation server.

    fedquant serve --data-dir data --insecure --port 50051 --rounds rounds.toml
    fedquant serve --data-dir data --tls-cert s.pem --tls-key s.key --tls-client-ca ca.pem \
        --tokens tokens.json --host 0.0.0.0

Plaintext needs ``--insecure`` and is refused on any but a loopback address (use TLS for
remote clients). Opening and closing rounds needs the admin token: the tokens file's
"operator" entry, ``--admin-token-file``, or the random one written to
``<data-dir>/admin.token`` at start-up. Start-up problems are reported in one line naming
the file and what is wrong (exit code 2). ``--port 0`` binds an ephemeral port;
``--port-file`` receives the bound port once the server is serving. ``--rounds`` opens the
rounds of a TOML file at start-up (rounds already in the log are kept as they are), e.g.::

    [[round]]
    id = "r1"
    codec = "eden:bits=2"  # a codec spec; or codec = "eden" with params = { bits = 2 }
    round_seed = 1
    shape = [1048576]
    expected = 10        # or: cohort = [1, 2, 3]
    quorum = 10          # default: the expected count
    deadline_s = 600     # default: no deadline

Also runnable without the other commands:
``python -m fedquant.server.cli --data-dir data --insecure``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import math
import os
import pathlib
import signal
import sqlite3
import sys
import threading
import tomllib
from typing import Annotated

import torch
import typer

from fedquant.server.aggregator import Limits, ServerConfig, start_server
from fedquant.server.metrics import configure_logging
from fedquant.server.rounds import MAX_COHORT, RoundConfig

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
    insecure: Annotated[bool, typer.Option(
        help="Serve plaintext (no TLS); only on a loopback --host.")] = False,
    tls_cert: Annotated[pathlib.Path | None, typer.Option(help="Server certificate (PEM).")]
    = None,
    tls_key: Annotated[pathlib.Path | None, typer.Option(help="Server private key (PEM).")]
    = None,
    tls_client_ca: Annotated[pathlib.Path | None, typer.Option(
        help="CA that signs client certificates: enables mutual TLS.")] = None,
    tokens: Annotated[pathlib.Path | None, typer.Option(
        help="JSON file mapping client ids and 'operator' to bearer tokens.")] = None,
    admin_token_file: Annotated[pathlib.Path | None, typer.Option(
        help="File holding the admin token (default: the tokens file's 'operator', else "
             "<data-dir>/admin.token, created if missing).")] = None,
    rounds: Annotated[pathlib.Path | None, typer.Option(
        help="TOML file of [[round]] tables to open at start-up.")] = None,
    max_push_bytes: Annotated[int, typer.Option(help="Cap on one push's bytes.")]
    = 256 * 1024 * 1024,
    push_timeout_s: Annotated[float, typer.Option(
        help="Cancel a push still streaming after this many seconds.")] = 600.0,
    idle_timeout_s: Annotated[float, typer.Option(
        help="Cancel a push that sends no chunk for this many seconds.")] = 10.0,
    max_streams_per_client: Annotated[int, typer.Option(
        help="Concurrent pushes of one token (or client id, without --tokens).")] = 4,
    max_streams: Annotated[int, typer.Option(help="Concurrent pushes in all.")] = 4096,
    max_buffered_bytes: Annotated[int, typer.Option(
        help="Bytes of pushes being received, in all.")] = 1024 * 1024 * 1024,
    max_clients_per_round: Annotated[int, typer.Option(
        help="Pushes any one round accepts.")] = MAX_COHORT,
    max_norm: Annotated[float, typer.Option(
        help="Reject (or clip) an update whose L2 norm exceeds this.")] = math.inf,
    norm_median_multiple: Annotated[float, typer.Option(
        help="Reject (or clip) an update whose norm exceeds this multiple of the median "
             "norm of the round's pushes so far (from the 3rd push on).")] = math.inf,
    norm_action: Annotated[str, typer.Option(
        help="What happens to an update above the norm bound: reject or clip.")] = "reject",
    workers: Annotated[int, typer.Option(help="Threads for the log's reads and writes.")] = 8,
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
    try:
        cfg = ServerConfig(
            data_dir=str(data_dir), host=host, port=port, insecure=insecure,
            tls_cert=_opt(tls_cert), tls_key=_opt(tls_key), tls_client_ca=_opt(tls_client_ca),
            tokens_file=_opt(tokens), admin_token_file=_opt(admin_token_file),
            limits=Limits(max_push_bytes=max_push_bytes, push_timeout_s=push_timeout_s,
                          idle_timeout_s=idle_timeout_s,
                          max_streams_per_client=max_streams_per_client,
                          max_streams=max_streams, max_buffered_bytes=max_buffered_bytes,
                          max_clients_per_round=max_clients_per_round),
            workers=workers,
            decode_slots=decode_slots, metrics_port=metrics_port, device=device,
            max_norm=max_norm, norm_median_multiple=norm_median_multiple,
            norm_action=norm_action, rounds=load_rounds(rounds) if rounds else [])
        running = start_server(cfg)
    except (ValueError, OSError, RuntimeError, sqlite3.Error) as e:
        # One line, naming the file or option and what is wrong: no traceback.
        print(f"fedquant serve: error: {_one_line(e)}", file=sys.stderr, flush=True)
        raise typer.Exit(2) from None
    for problem in running.book.problems:
        print(f"fedquant serve: quarantined a bad log row: {problem}", file=sys.stderr,
              flush=True)
    if port_file is not None:
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(str(running.port))
        os.replace(tmp, port_file)  # atomic: a reader never sees a partial number
    log.info("listening", extra={"fields": {
        "host": host, "port": running.port, "tls": not insecure,
        "mtls": tls_client_ca is not None, "tokens": tokens is not None, "pid": os.getpid()}})
    print(json.dumps({"port": running.port}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    running.stop()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text


def _opt(path: pathlib.Path | None) -> str | None:
    return None if path is None else str(path)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


if __name__ == "__main__":
    typer.run(serve)
