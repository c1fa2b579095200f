"""The gRPC aggregation service (``proto/fedquant/v1/aggregator.proto``) and its server.

``Push`` receives one client's serialized ``EncodedUpdate`` in chunks, rejecting it before
buffering more as soon as something is wrong (unknown or closed round, duplicate, over-size);
parses it with the validating ``fq.Encoded.from_bytes``, decodes it by the codec's fast path
into the round's running sum (on ``decode_slots`` decode threads, so peak memory does
not grow with the number of clients), and acknowledges only after the durable log committed.
``GetMean`` streams the closed round's mean as float32 chunks.

Example::

    running = start_server(ServerConfig(data_dir="data", insecure=True, port=0))
    print(running.port); running.stop()
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import torch
from fedquant.server.metrics import Metrics, serve_metrics
from fedquant.server.rounds import ROUND_ID, AggregationError, Round, RoundBook, RoundConfig
from fedquant.server.security import Authenticator, load_tokens, server_credentials
from fedquant.server.store import Store
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import fedquant as fq
from fedquant._proto import aggregator_pb2 as pb
from fedquant._proto import aggregator_pb2_grpc as pb_grpc

log = logging.getLogger("fedquant.server")

SERVICE = pb.DESCRIPTOR.services_by_name["Aggregator"].full_name
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's default; pushes larger than this are chunked
MEAN_CHUNK_BYTES = 1024 * 1024
MAX_WAIT_S = 300.0
_STATES = {"open": pb.OPEN, "closing": pb.CLOSED, "closed": pb.CLOSED}  # closing: final


@dataclass
class ServerConfig:
    """Options of ``fedquant serve`` (see server/cli.py for their help)."""

    data_dir: str
    host: str = "127.0.0.1"
    port: int = 0
    insecure: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tokens_file: str | None = None
    max_push_bytes: int = 256 * 1024 * 1024
    push_timeout_s: float = 600.0
    workers: int = 32
    decode_slots: int = max(1, min(8, os.cpu_count() or 1))
    metrics_port: int | None = None
    device: str = "cpu"  # where pushes are decoded and summed ("cuda" works unchanged)
    rounds: list[RoundConfig] = field(default_factory=list)


class AggregatorServicer(pb_grpc.AggregatorServicer):
    """The Aggregator service over a :class:`RoundBook`."""

    def __init__(self, book: RoundBook, auth: Authenticator, metrics: Metrics,
                 max_push_bytes: int, decode_slots: int, push_timeout_s: float = 600.0):
        self.book, self.auth, self.metrics = book, auth, metrics
        self.max_push_bytes, self.push_timeout_s = max_push_bytes, push_timeout_s
        self.decoder = futures.ThreadPoolExecutor(decode_slots, thread_name_prefix="decode")

    # ---- operator calls ----------------------------------------------------------------
    def OpenRound(self, request, context):  # noqa: N802 (gRPC method name)
        def run():
            self.auth.require_operator(context)
            try:
                config = RoundConfig.build(
                    request.round_id, request.codec.name, dict(request.codec.params),
                    request.round_seed, [int(n) for n in request.shape],
                    [int(c) for c in request.cohort], request.expected_count, request.quorum,
                    request.deadline_s)
            except ValueError as e:
                raise AggregationError("INVALID_ARGUMENT", str(e)) from None
            rnd = self.book.open(config)
            self.metrics.add("fedquant_rounds_opened_total")
            return round_status(rnd)
        return _answer(context, run)

    def CloseRound(self, request, context):  # noqa: N802
        def run():
            self.auth.require_operator(context)
            rnd = self.book.get(request.round_id)
            self.book.close(rnd, "operator")
            return round_status(rnd)
        return _answer(context, run)

    def GetRound(self, request, context):  # noqa: N802
        def run():
            self.auth.principal(context)
            return round_status(self.book.get(request.round_id))
        return _answer(context, run)

    # ---- clients -----------------------------------------------------------------------
    def Push(self, request_iterator, context):  # noqa: N802
        started = time.perf_counter()
        outcome = "OK"
        where: dict = {}  # round and client, once the header is read (for the logs)
        # A client that stalls mid-stream would hold a worker thread for ever: cancel it.
        watchdog = threading.Timer(self.push_timeout_s, context.cancel)
        watchdog.daemon = True
        watchdog.start()
        try:
            return self._receive_and_aggregate(request_iterator, context, where, watchdog)
        except grpc.RpcError:  # the stream broke: cancelled by the client or the watchdog
            outcome = "CANCELLED"
            log.warning("push_cancelled", extra={"fields": {**where, "peer": context.peer()}})
            return None
        except AggregationError as e:
            outcome = e.status
            log.warning("push_rejected", extra={"fields": {
                **where, "status": e.status, "reason": str(e), "peer": context.peer()}})
            if e.digest:
                context.set_trailing_metadata((("fedquant-sha256", e.digest),))
            context.abort(getattr(grpc.StatusCode, e.status), str(e))
        finally:
            watchdog.cancel()
            self.metrics.add("fedquant_pushes_total", label=f'status="{outcome}"')
            self.metrics.add("fedquant_push_seconds_total", time.perf_counter() - started)

    def _receive_and_aggregate(self, chunks, context, where: dict,
                               watchdog: threading.Timer) -> pb.PushAck:
        self.auth.principal(context)  # UNAUTHENTICATED before reading anything
        first = next(chunks, None)
        if first is None or not first.HasField("header"):
            raise AggregationError("INVALID_ARGUMENT", "the first chunk must carry the header")
        header = first.header
        where.update(round=header.round_id[:128], client=header.client_id)
        _check_header(header)
        self.auth.require_client(context, header.client_id)
        rnd = self.book.get(header.round_id)
        self.book.check_push(rnd, header.client_id)
        cap = min(self.max_push_bytes, round_cap(rnd.config.numel))
        if header.total_bytes > cap:
            raise AggregationError("RESOURCE_EXHAUSTED", f"total_bytes {header.total_bytes} "
                                   f"exceeds the cap of {cap} bytes for round {rnd.round_id!r}")
        payload = bytearray()
        for chunk in itertools.chain([first], chunks):
            if chunk is not first and chunk.HasField("header"):
                raise AggregationError("INVALID_ARGUMENT",
                                       "only the first chunk may carry a header")
            if len(payload) + len(chunk.data) > header.total_bytes:
                raise AggregationError("INVALID_ARGUMENT", f"more bytes than the declared "
                                       f"total_bytes {header.total_bytes}")
            payload += chunk.data  # bounded: total_bytes <= max_push_bytes was checked above
        watchdog.cancel()  # all bytes are in: decoding time does not count
        if len(payload) != header.total_bytes:
            raise AggregationError("INVALID_ARGUMENT", f"received {len(payload)} bytes, "
                                   f"declared total_bytes {header.total_bytes}")
        payload = bytes(payload)
        try:
            enc = fq.Encoded.from_bytes(payload)
        except fq.WireError as e:
            raise AggregationError("INVALID_ARGUMENT", f"malformed EncodedUpdate: {e}") from None
        self.book.check_payload(rnd, header.client_id, enc)
        digest = hashlib.sha256(payload).hexdigest()
        # Decode, log and sum on the few decode threads: at most `decode_slots` d-sized
        # temporaries exist at once, and only those threads' malloc arenas ever hold them,
        # so peak RSS does not grow with the number of concurrent clients.
        pushes, state, decode_s = self.decoder.submit(
            self._decode_and_accept, rnd, header, payload, digest, enc).result()
        self.metrics.add("fedquant_push_bytes_total", len(payload))
        self.metrics.add("fedquant_decode_seconds_total", decode_s)
        log.info("push_accepted", extra={"fields": {
            "round": rnd.round_id, "client": header.client_id, "bytes": len(payload)}})
        return pb.PushAck(round_id=rnd.round_id, client_id=header.client_id,
                          bytes_received=len(payload), sha256=digest, num_pushes=pushes,
                          state=_STATES[state])

    def _decode_and_accept(self, rnd: Round, header: pb.PushHeader, payload: bytes,
                           digest: str, enc: fq.Encoded) -> tuple[int, str, float]:
        started = time.perf_counter()
        try:
            contribution = self.book.decode(rnd, enc, header.weight)
        except (fq.WireError, ValueError, RuntimeError) as e:
            raise AggregationError("INVALID_ARGUMENT", f"cannot decode payload: {e}") from None
        decode_s = time.perf_counter() - started
        pushes, state = self.book.accept(rnd, header.client_id, header.weight, payload, digest,
                                         contribution, decode_s, close_on_quorum=False)
        if state == "closing":  # this push completed the quorum: close after acknowledging
            self.decoder.submit(self._close_on_quorum, rnd)
        return pushes, state, decode_s

    def _close_on_quorum(self, rnd: Round) -> None:
        try:
            self.book.close(rnd, "quorum")
        except Exception:  # the round stays open in the log; a restart closes it
            log.exception("close_failed", extra={"fields": {"round": rnd.round_id}})

    def GetMean(self, request, context):  # noqa: N802
        try:
            self.auth.principal(context)
            rnd = self.book.get(request.round_id)
            wait_s = request.wait_s if math.isfinite(request.wait_s) else 0.0
            if wait_s > 0:
                remaining = context.time_remaining()
                limit = MAX_WAIT_S if remaining is None else max(remaining, 0.0)
                rnd.closed.wait(min(wait_s, limit))
            if rnd.state != "closed":
                raise AggregationError("FAILED_PRECONDITION", f"round {rnd.round_id!r} is "
                                       f"still open ({len(rnd.pushes)}/{rnd.config.quorum} "
                                       "pushes)")
            mean = self.book.mean(rnd)
            if mean is None:
                raise AggregationError("FAILED_PRECONDITION", f"round {rnd.round_id!r} closed "
                                       f"({rnd.close_reason}) with no pushes: no mean")
        except AggregationError as e:
            context.abort(getattr(grpc.StatusCode, e.status), str(e))
        data = mean.numpy().astype("<f4").tobytes()
        per_chunk = MEAN_CHUNK_BYTES // 4
        for start in range(0, mean.numel(), per_chunk):
            chunk = pb.MeanChunk(offset=start, data=data[4 * start: 4 * (start + per_chunk)])
            if start == 0:
                chunk.shape.extend(rnd.config.shape)
                chunk.num_pushes = len(rnd.pushes)
                chunk.total_weight = rnd.total_weight
            yield chunk


def round_cap(numel: int) -> int:
    """Most bytes one push to a round of `numel` elements may declare: 128 bits per element
    (more than any codec sends: fp32 is 32) plus 1 MiB of headers, so that many concurrent
    pushes cannot make the server buffer far more than their rounds can use."""
    return 16 * numel + 1024 * 1024


def _check_header(header: pb.PushHeader) -> None:
    if not ROUND_ID.fullmatch(header.round_id):
        raise AggregationError("INVALID_ARGUMENT", f"header.round_id {header.round_id!r} must "
                               "be 1..128 chars of [A-Za-z0-9_.-]")
    if not math.isfinite(header.weight) or header.weight <= 0:
        raise AggregationError("INVALID_ARGUMENT", f"header.weight must be finite and > 0, "
                               f"got {header.weight}")
    if header.total_bytes == 0:
        raise AggregationError("INVALID_ARGUMENT", "header.total_bytes must be > 0")


def _answer(context, run):
    try:
        return run()
    except AggregationError as e:
        context.abort(getattr(grpc.StatusCode, e.status), str(e))


def round_status(rnd: Round) -> pb.RoundStatus:
    cfg = rnd.config
    with rnd.lock:
        pushes = [pb.PushRecord(client_id=c, weight=p.weight, bytes=p.nbytes, sha256=p.sha256)
                  for c, p in rnd.pushes.items()]
        msg = pb.RoundStatus(
            round_id=cfg.round_id, state=_STATES[rnd.state],
            codec=pb.CodecSpec(name=cfg.codec, params=cfg.params), round_seed=cfg.round_seed,
            shape=cfg.shape, cohort=cfg.cohort, expected_count=cfg.expected_count,
            quorum=cfg.quorum, deadline_unix=cfg.deadline_unix, pushes=pushes,
            bytes_received=rnd.bytes_received, total_weight=rnd.total_weight,
            close_reason=rnd.close_reason)
    return msg


@dataclass
class RunningServer:
    """A started server: its bound port and a `stop()` that shuts everything down."""

    server: grpc.Server
    port: int
    book: RoundBook
    metrics: Metrics
    health: health.HealthServicer
    _stop: threading.Event
    _extras: list

    def stop(self, grace: float = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self._stop.set()
        self.server.stop(grace).wait()
        for extra in self._extras:
            extra.shutdown()
        self.book.store.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def start_server(cfg: ServerConfig) -> RunningServer:
    """Recover the rounds from the log, bind, and start serving; returns the running server."""
    if not cfg.insecure and not (cfg.tls_cert and cfg.tls_key):
        raise ValueError("pass --tls-cert and --tls-key, or --insecure for plaintext")
    if cfg.tls_client_ca and not cfg.tls_cert:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {cfg.device!r}; e.g. cpu, cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    auth = Authenticator(load_tokens(cfg.tokens_file) if cfg.tokens_file else None)
    book = RoundBook(Store(cfg.data_dir), cfg.device)
    for config in cfg.rounds:
        try:
            book.get(config.round_id)  # already in the log from a previous run
        except AggregationError:
            book.open(config)
    metrics = Metrics()
    servicer = AggregatorServicer(book, auth, metrics, cfg.max_push_bytes, cfg.decode_slots,
                                  cfg.push_timeout_s)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers), options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    pb_grpc.add_AggregatorServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = f"{cfg.host}:{cfg.port}"
    if cfg.insecure:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, server_credentials(
            cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca))
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    server.start()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    stop = threading.Event()
    extras = [servicer.decoder]  # shut down after the gRPC server

    def close_deadlines():
        while not stop.wait(0.05):
            book.close_expired()

    threading.Thread(target=close_deadlines, daemon=True, name="deadlines").start()
    if cfg.metrics_port is not None:
        def render():
            open_rounds = len(book.open_rounds())
            return metrics.render({"fedquant_rounds_open": open_rounds,
                                   "fedquant_rounds": len(book.round_ids())})
        extras.append(serve_metrics(render, cfg.host, cfg.metrics_port))
    return RunningServer(server, port, book, metrics, health_servicer, stop, extras)
