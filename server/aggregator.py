"""The gRPC aggregation service (``proto/fedquant/v1/aggregator.proto``) and its server.

The server is asynchronous (``grpc.aio``): a call that waits, a ``GetMean`` waiting for its
round to close or a ``Push`` whose client is slow, holds no thread, so any number of clients
can push and then wait for the mean. Blocking work runs on two small pools: ``decode_slots``
threads parse, decode, screen and log pushes (so peak memory does not grow with the number
of clients), and ``workers`` threads serve the log's other reads and writes.

``Push`` receives one client's serialized ``EncodedUpdate`` in chunks, rejecting it before
buffering more as soon as something is wrong (unknown or closed round, duplicate, over-size,
too many streams from one principal, server-wide buffer full), cancels it when no chunk
arrives for ``idle_timeout_s`` or the whole push takes more than ``push_timeout_s``; parses
it with the validating ``fq.Encoded.from_bytes``, decodes it by the codec's fast path,
screens its norm (``fedquant.robust``), and acknowledges only after the durable log
committed. ``GetMean`` streams the closed round's mean as float32 chunks.

Who may call what is in ``server/security.py``; limits are :class:`Limits`.

Example::

    running = start_server(ServerConfig(data_dir="data", insecure=True, port=0))
    print(running.port); running.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import logging
import math
import os
import socket
import threading
import time
from collections import Counter, OrderedDict
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

import fedquant as fq
from fedquant._proto import aggregator_pb2 as pb
from fedquant._proto import aggregator_pb2_grpc as pb_grpc
from fedquant.robust import NormPolicy
from fedquant.server.metrics import Metrics, serve_metrics
from fedquant.server.rounds import (
    MAX_COHORT,
    MAX_WEIGHT,
    ROUND_ID,
    AggregationError,
    Round,
    RoundBook,
    RoundConfig,
    parse_payload,
)
from fedquant.server.security import Authenticator, admin_token, load_tokens, server_credentials
from fedquant.server.store import Store, StoreError

log = logging.getLogger("fedquant.server")

SERVICE = pb.DESCRIPTOR.services_by_name["Aggregator"].full_name
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's default; pushes larger than this are chunked
MEAN_CHUNK_BYTES = 64 * 1024  # small: a thousand concurrent readers hold one chunk each
MEAN_CACHE_ROUNDS = 4  # closed rounds whose serialized mean stays in memory
MEAN_CACHE_BYTES = 64 * 1024 * 1024  # larger means are read per burst of calls, not kept
_STATES = {"open": pb.OPEN, "closing": pb.CLOSED, "closed": pb.CLOSED}  # closing: final
LOOPBACK_NAMES = ("localhost",)


@dataclass
class Limits:
    """Resource limits of the server (``fedquant serve`` flags of the same names).

    Args:
        max_push_bytes (int, default 256 MiB): one push's bytes (also at most
            :func:`round_cap` of its round).
        push_timeout_s (float, default 600): a whole push's receiving time.
        idle_timeout_s (float, default 10): the longest gap between two chunks of a push.
        max_streams_per_client (int, default 4): concurrent pushes of one principal (a
            token's owner; without a tokens file, one client id).
        max_streams (int, default 4096): concurrent pushes in all.
        max_buffered_bytes (int, default 1 GiB): bytes of pushes being received, in all.
        max_clients_per_round (int, default 10000): pushes any one round accepts.
        max_wait_s (float, default 300): the longest a GetMean waits for its round.
    """

    max_push_bytes: int = 256 * 1024 * 1024
    push_timeout_s: float = 600.0
    idle_timeout_s: float = 10.0
    max_streams_per_client: int = 4
    max_streams: int = 4096
    max_buffered_bytes: int = 1024 * 1024 * 1024
    max_clients_per_round: int = MAX_COHORT
    max_wait_s: float = 300.0

    def check(self) -> None:
        """ValueError naming the first limit that is not positive."""
        for name, value in vars(self).items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number, "
                                 f"got {value}")


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
    admin_token_file: str | None = None
    limits: Limits = field(default_factory=Limits)
    workers: int = 8
    decode_slots: int = max(1, min(8, os.cpu_count() or 1))
    metrics_port: int | None = None
    device: str = "cpu"  # where pushes are decoded and summed ("cuda" works unchanged)
    max_norm: float = math.inf
    norm_median_multiple: float = math.inf
    norm_action: str = "reject"
    rounds: list[RoundConfig] = field(default_factory=list)

    def policy(self) -> NormPolicy:
        return NormPolicy(max_norm=self.max_norm, median_multiple=self.norm_median_multiple,
                          action=self.norm_action)


class _Gate:
    """Counts what Push streams hold: streams per principal, streams and buffered bytes in
    all. Used from the event loop only, so it needs no lock."""

    __slots__ = ("limits", "per_key", "streams", "buffered")

    def __init__(self, limits: Limits):
        self.limits = limits
        self.per_key: Counter = Counter()
        self.streams = 0
        self.buffered = 0

    def enter(self) -> None:
        if self.streams >= self.limits.max_streams:
            raise AggregationError("UNAVAILABLE", f"the server is receiving "
                                   f"{self.streams} pushes, its limit; retry")
        self.streams += 1

    def leave(self) -> None:
        self.streams -= 1

    def claim(self, key: str) -> None:
        if self.per_key[key] >= self.limits.max_streams_per_client:
            raise AggregationError("RESOURCE_EXHAUSTED", f"{key} already has "
                                   f"{self.per_key[key]} pushes in flight, the limit "
                                   "(--max-streams-per-client)")
        self.per_key[key] += 1

    def unclaim(self, key: str) -> None:
        self.per_key[key] -= 1
        if not self.per_key[key]:
            del self.per_key[key]

    def reserve(self, nbytes: int) -> None:
        if self.buffered + nbytes > self.limits.max_buffered_bytes:
            raise AggregationError("UNAVAILABLE", f"the server is buffering {self.buffered} "
                                   f"bytes of pushes; {nbytes} more would pass its cap of "
                                   f"{self.limits.max_buffered_bytes}; retry")
        self.buffered += nbytes

    def release(self, nbytes: int) -> None:
        self.buffered -= nbytes


class AggregatorServicer(pb_grpc.AggregatorServicer):
    """The Aggregator service over a :class:`RoundBook` (coroutines on one event loop)."""

    def __init__(self, book: RoundBook, auth: Authenticator, metrics: Metrics, limits: Limits,
                 decode_slots: int, workers: int):
        self.book, self.auth, self.metrics, self.limits = book, auth, metrics, limits
        self.decoder = futures.ThreadPoolExecutor(decode_slots, thread_name_prefix="decode")
        self.io = futures.ThreadPoolExecutor(workers, thread_name_prefix="io")
        self.gate = _Gate(limits)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._close_events: dict[str, asyncio.Event] = {}
        # Serialized means of recently closed rounds: the clients waiting for one round
        # share one read of its file and one copy of its bytes.
        self._means: OrderedDict[str, asyncio.Future] = OrderedDict()

    # ---- plumbing ----------------------------------------------------------------------
    async def _run(self, pool: futures.Executor, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(
            pool, functools.partial(fn, *args))

    def round_closed(self, round_id: str) -> None:
        """RoundBook's on_close hook (any thread): wake the GetMean calls waiting."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is shutting down
                loop.call_soon_threadsafe(self._wake, round_id)

    def _wake(self, round_id: str) -> None:
        event = self._close_events.pop(round_id, None)
        if event is not None:
            event.set()

    async def _abort(self, context, e: AggregationError) -> None:
        if e.digest:
            context.set_trailing_metadata((("fedquant-sha256", e.digest),))
        await context.abort(getattr(grpc.StatusCode, e.status), str(e))

    # ---- operator calls ----------------------------------------------------------------
    async def OpenRound(self, request, context):  # noqa: N802 (gRPC method name)
        try:
            self.auth.require_operator(context)
            try:
                config = RoundConfig.build(
                    request.round_id, request.codec.name, dict(request.codec.params),
                    request.round_seed, [int(n) for n in request.shape],
                    [int(c) for c in request.cohort], request.expected_count, request.quorum,
                    request.deadline_s)
            except ValueError as e:
                raise AggregationError("INVALID_ARGUMENT", str(e)) from None
            rnd = await self._run(self.io, self.book.open, config)
            self.metrics.add("fedquant_rounds_opened_total")
            return round_status(rnd)
        except AggregationError as e:
            await self._abort(context, e)

    async def CloseRound(self, request, context):  # noqa: N802
        try:
            self.auth.require_operator(context)
            rnd = await self._run(self.io, self.book.get, request.round_id)
            await self._run(self.io, self.book.close, rnd, "operator")
            return round_status(rnd)
        except AggregationError as e:
            await self._abort(context, e)

    async def GetRound(self, request, context):  # noqa: N802
        try:
            principal = self.auth.principal(context)
            rnd = await self._run(self.io, self.book.get, request.round_id)
            self._may_see(principal, rnd)
            return round_status(rnd, None if self.auth.is_admin(principal) else principal)
        except AggregationError as e:
            await self._abort(context, e)

    def _may_see(self, principal: str | None, rnd: Round, mean: bool = False) -> None:
        """PERMISSION_DENIED unless `principal` may read this round (its mean, if `mean`):
        admins always; clients of its cohort; for a round without a cohort, any client
        (the configuration) or the clients that pushed (the mean); anonymous callers only
        when the server has no tokens file (then every caller is anonymous)."""
        if principal is None or self.auth.is_admin(principal):
            return
        client = int(principal)
        cohort = rnd.config.cohort
        if cohort and client not in cohort:
            raise AggregationError("PERMISSION_DENIED", f"client {client} is not in the "
                                   f"cohort of round {rnd.round_id!r}")
        if mean and not cohort and client not in rnd.pushes:
            raise AggregationError("PERMISSION_DENIED", f"client {client} did not push to "
                                   f"round {rnd.round_id!r}: only its clients read its mean")

    # ---- clients -----------------------------------------------------------------------
    async def Push(self, request_iterator, context):  # noqa: N802
        started = time.perf_counter()
        outcome = "OK"
        where: dict = {}  # round and client, once the header is read (for the logs)
        held: list = []  # (release function, argument) of what this push holds
        try:
            principal = self.auth.principal(context)  # UNAUTHENTICATED before reading
            self.gate.enter()
            held.append((self.gate.leave, None))
            if principal is not None:
                self.gate.claim(principal)
                held.append((self.gate.unclaim, principal))
            try:
                async with asyncio.timeout(self.limits.push_timeout_s):
                    header, rnd, payload = await self._receive(
                        request_iterator, context, principal, where, held)
            except TimeoutError:
                raise AggregationError("CANCELLED", f"push not received within "
                                       f"{self.limits.push_timeout_s:g} s: cancelled") from None
            job = asyncio.get_running_loop().run_in_executor(
                self.decoder, self._decode_and_accept, rnd, header, payload)
            try:
                ack = await asyncio.shield(job)
            except asyncio.CancelledError:  # the client left while its push is decoded:
                await asyncio.wait({job})  # its bytes stay reserved until the decode ends
                raise
            log.info("push_accepted", extra={"fields": {
                "round": rnd.round_id, "client": header.client_id, "bytes": len(payload)}})
            return ack
        except AggregationError as e:
            outcome = e.status
            log.warning("push_rejected", extra={"fields": {
                **where, "status": e.status, "reason": str(e), "peer": context.peer()}})
            await self._abort(context, e)
        except asyncio.CancelledError:  # the client went away
            outcome = "CANCELLED"
            log.warning("push_cancelled", extra={"fields": {**where, "peer": context.peer()}})
            raise
        finally:
            for release, arg in reversed(held):
                release() if arg is None else release(arg)
            self.metrics.add("fedquant_pushes_total", label=f'status="{outcome}"')
            self.metrics.add("fedquant_push_seconds_total", time.perf_counter() - started)

    async def _next(self, chunks) -> pb.PushChunk | None:
        """The next chunk, None at the end; CANCELLED after idle_timeout_s without one."""
        try:
            async with asyncio.timeout(self.limits.idle_timeout_s):  # no task per chunk
                return await anext(chunks, None)
        except TimeoutError:
            raise AggregationError("CANCELLED", f"no data for {self.limits.idle_timeout_s:g} s"
                                   " (--idle-timeout-s): push cancelled") from None

    async def _receive(self, request_iterator, context, principal, where: dict,
                       held: list) -> tuple[pb.PushHeader, Round, bytearray]:
        chunks = aiter(request_iterator)
        first = await self._next(chunks)
        if first is None or not first.HasField("header"):
            raise AggregationError("INVALID_ARGUMENT", "the first chunk must carry the header")
        header = first.header
        where.update(round=header.round_id[:128], client=header.client_id)
        _check_header(header)
        self.auth.require_client(context, header.client_id)
        if principal is None:  # anonymous clients: the stream limit is per client id
            key = f"client {header.client_id}"
            self.gate.claim(key)
            held.append((self.gate.unclaim, key))
        rnd = self.book.get_open(header.round_id)
        if rnd is None:  # closed or unknown: ask the log (off the event loop)
            rnd = await self._run(self.io, self.book.get, header.round_id)
        self.book.check_push(rnd, header.client_id)
        cap = min(self.limits.max_push_bytes, round_cap(rnd.config.numel))
        if header.total_bytes > cap:
            raise AggregationError("RESOURCE_EXHAUSTED", f"total_bytes {header.total_bytes} "
                                   f"exceeds the cap of {cap} bytes for round {rnd.round_id!r}")
        total = header.total_bytes
        self.gate.reserve(total)
        held.append((self.gate.release, total))
        # One buffer of the declared size, filled in place: no second copy of the payload.
        payload = bytearray(total)
        view, filled, chunk = memoryview(payload), 0, first
        while chunk is not None:
            if chunk is not first and chunk.HasField("header"):
                raise AggregationError("INVALID_ARGUMENT",
                                       "only the first chunk may carry a header")
            data = chunk.data
            if filled + len(data) > total:
                raise AggregationError("INVALID_ARGUMENT", f"more bytes than the declared "
                                       f"total_bytes {total}")
            view[filled: filled + len(data)] = data
            filled += len(data)
            chunk = await self._next(chunks)
        view.release()
        if filled != total:
            raise AggregationError("INVALID_ARGUMENT", f"received {filled} bytes, "
                                   f"declared total_bytes {total}")
        return header, rnd, payload

    def _decode_and_accept(self, rnd: Round, header: pb.PushHeader,
                           payload: bytearray) -> pb.PushAck:
        """Parse, check, decode, screen and log one push (on a decode thread: at most
        `decode_slots` d-sized temporaries exist at once)."""
        started = time.perf_counter()
        try:
            enc = parse_payload(payload)
        except fq.WireError as e:
            raise AggregationError("INVALID_ARGUMENT", f"malformed EncodedUpdate: {e}") from None
        self.book.check_payload(rnd, header.client_id, enc)
        stratum = self.book.stratum_of(rnd, enc)  # None unless a correlated round
        digest = hashlib.sha256(payload).hexdigest()
        try:
            contribution = self.book.decode(rnd, enc, header.weight)
        except (fq.WireError, ValueError, RuntimeError) as e:
            self._screened_out(rnd, header.client_id, f"cannot decode payload: {e}")
            raise AggregationError("INVALID_ARGUMENT", f"cannot decode payload: {e}") from None
        del enc
        verdict = self.book.judge(rnd, contribution, header.weight)
        if not verdict.accepted:
            self._screened_out(rnd, header.client_id, verdict.reason)
            raise AggregationError("FAILED_PRECONDITION", f"update rejected: {verdict.reason}")
        if verdict.clipped:
            self.metrics.add("fedquant_pushes_clipped_total")
        decode_s = time.perf_counter() - started
        pushes, state = self.book.accept(rnd, header.client_id, header.weight, payload, digest,
                                         contribution, decode_s, close_on_quorum=False,
                                         verdict=verdict, stratum=stratum)
        if state == "closing":  # this push completed the quorum: close after acknowledging
            self.decoder.submit(self._close_on_quorum, rnd)
        self.metrics.add("fedquant_push_bytes_total", len(payload))
        self.metrics.add("fedquant_decode_seconds_total", decode_s)
        return pb.PushAck(round_id=rnd.round_id, client_id=header.client_id,
                          bytes_received=len(payload), sha256=digest, num_pushes=pushes,
                          state=_STATES[state])

    def _screened_out(self, rnd: Round, client_id: int, reason: str) -> None:
        """A push that one client got wrong: recorded with its reason, the round goes on."""
        kind = "norm" if "norm" in reason else "nonfinite" if "NaN" in reason else "decode"
        self.metrics.add("fedquant_pushes_screened_out_total", label=f'reason="{kind}"')
        try:
            self.book.reject(rnd, client_id, reason)
        except Exception:  # the record is best effort: the push is refused anyway
            log.exception("rejection_not_recorded", extra={"fields": {"round": rnd.round_id}})

    def _close_on_quorum(self, rnd: Round) -> None:
        try:
            self.book.close(rnd, "quorum")
        except Exception:  # the round stays open in the log; a restart closes it
            log.exception("close_failed", extra={"fields": {"round": rnd.round_id}})

    async def GetMean(self, request, context):  # noqa: N802
        try:
            principal = self.auth.principal(context)
            rnd = await self._run(self.io, self.book.get, request.round_id)
            self._may_see(principal, rnd, mean=True)
            wait_s = request.wait_s if math.isfinite(request.wait_s) else 0.0
            if rnd.state != "closed" and wait_s > 0:
                # Registered before the state is read again: a close in between still wakes.
                event = self._close_events.setdefault(rnd.round_id, asyncio.Event())
                if rnd.state != "closed":
                    remaining = context.time_remaining()
                    limit = self.limits.max_wait_s if remaining is None else max(remaining, 0)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(),
                                               min(wait_s, limit, self.limits.max_wait_s))
            if rnd.state != "closed":
                raise AggregationError("FAILED_PRECONDITION", f"round {rnd.round_id!r} is "
                                       f"still open ({len(rnd.pushes)}/{rnd.config.quorum} "
                                       "pushes)")
            data = await self._mean_bytes(rnd)
            if data is None:
                raise AggregationError("FAILED_PRECONDITION", f"round {rnd.round_id!r} closed "
                                       f"({rnd.close_reason}) with no pushes: no mean")
        except AggregationError as e:
            await self._abort(context, e)
            return
        per_chunk = MEAN_CHUNK_BYTES // 4
        for start in range(0, len(data) // 4, per_chunk):
            chunk = pb.MeanChunk(offset=start, data=data[4 * start: 4 * (start + per_chunk)])
            if start == 0:
                chunk.shape.extend(rnd.config.shape)
                chunk.num_pushes = len(rnd.pushes)
                chunk.total_weight = rnd.total_weight
            yield chunk


    async def _mean_bytes(self, rnd: Round) -> bytes | None:
        """The closed round's mean as little-endian float32 bytes (None: no pushes), read
        once for all the calls that want it at the same time; small means stay cached."""
        future = self._means.get(rnd.round_id)
        if future is None:
            future = asyncio.ensure_future(self._run(self.io, self._read_mean, rnd))
            self._means[rnd.round_id] = future
        try:
            data = await asyncio.shield(future)
        except AggregationError:
            if self._means.get(rnd.round_id) is future:
                del self._means[rnd.round_id]  # not cached: a later call reads again
            raise
        if data is not None and len(data) > MEAN_CACHE_BYTES and (
                self._means.get(rnd.round_id) is future):
            del self._means[rnd.round_id]  # served to the calls already waiting, not kept
        while len(self._means) > MEAN_CACHE_ROUNDS:
            self._means.popitem(last=False)
        return data

    def _read_mean(self, rnd: Round) -> bytes | None:
        mean = self.book.mean(rnd)
        return None if mean is None else mean.numpy().astype("<f4", copy=False).tobytes()


def round_cap(numel: int) -> int:
    """Most bytes one push to a round of `numel` elements may declare: 128 bits per element
    (more than any codec sends: fp32 is 32) plus 1 MiB of headers, so that many concurrent
    pushes cannot make the server buffer far more than their rounds can use."""
    return 16 * numel + 1024 * 1024


def _check_header(header: pb.PushHeader) -> None:
    if not ROUND_ID.fullmatch(header.round_id):
        raise AggregationError("INVALID_ARGUMENT", f"header.round_id {header.round_id!r} must "
                               "be 1..128 chars of [A-Za-z0-9_.-]")
    if not math.isfinite(header.weight) or not 0 < header.weight <= MAX_WEIGHT:
        raise AggregationError("INVALID_ARGUMENT", f"header.weight must be finite, > 0 and "
                               f"<= {MAX_WEIGHT:g}, got {header.weight}")
    if header.total_bytes == 0:
        raise AggregationError("INVALID_ARGUMENT", "header.total_bytes must be > 0")


def round_status(rnd: Round, viewer: str | None = None) -> pb.RoundStatus:
    """The round's status; for a client `viewer` ("operator" or None: everything) only its
    own push is listed."""
    cfg = rnd.config
    with rnd.lock:
        pushes = [pb.PushRecord(client_id=c, weight=p.weight, bytes=p.nbytes, sha256=p.sha256)
                  for c, p in rnd.pushes.items() if viewer is None or str(c) == viewer]
        msg = pb.RoundStatus(
            round_id=cfg.round_id, state=_STATES[rnd.state],
            codec=pb.CodecSpec(name=cfg.codec, params=cfg.params), round_seed=cfg.round_seed,
            shape=cfg.shape, cohort=cfg.cohort, expected_count=cfg.expected_count,
            quorum=cfg.quorum, deadline_unix=cfg.deadline_unix, pushes=pushes,
            bytes_received=rnd.bytes_received, total_weight=rnd.total_weight,
            close_reason=rnd.close_reason)
        for c, why in rnd.rejected.items():  # the pushes refused, with their reasons
            if viewer is None or str(c) == viewer:
                msg.rejected.add(client_id=c, reason=why)
    return msg


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class RunningServer:
    """A started server: its bound port and a `stop()` that shuts everything down."""

    port: int
    book: RoundBook
    metrics: Metrics
    servicer: AggregatorServicer
    _server: grpc.aio.Server
    _health: HealthServicer
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread
    _stop: threading.Event
    _extras: list

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving (calls in flight get `grace` seconds), then close the log."""
        if self._stop.is_set():
            return
        self._stop.set()

        async def shutdown():
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(grace + 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        for extra in self._extras:
            extra.shutdown()
        self.servicer.decoder.shutdown(wait=True)
        self.servicer.io.shutdown(wait=True)
        self.book.store.close()

    def wait(self) -> None:
        """Block until :meth:`stop` (e.g. from a signal handler)."""
        while not self._stop.wait(0.5):
            pass
        self._thread.join(30)


def check_config(cfg: ServerConfig) -> None:
    """ValueError for options that must be refused before anything binds or opens."""
    if not cfg.insecure and not (cfg.tls_cert and cfg.tls_key):
        raise ValueError("pass --tls-cert and --tls-key, or --insecure for plaintext")
    if cfg.tls_client_ca and not cfg.tls_cert:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if cfg.insecure and not is_loopback(cfg.host):
        raise ValueError(f"--insecure (plaintext) binds only a loopback address, got --host "
                         f"{cfg.host}: use --tls-cert/--tls-key for remote clients")
    cfg.limits.check()
    if cfg.workers < 1 or cfg.decode_slots < 1:
        raise ValueError("--workers and --decode-slots must be >= 1")
    cfg.policy()  # ValueError names a bad norm option
    for flag, path in (("--tls-cert", cfg.tls_cert), ("--tls-key", cfg.tls_key),
                       ("--tls-client-ca", cfg.tls_client_ca), ("--tokens", cfg.tokens_file),
                       ("--admin-token-file", cfg.admin_token_file)):
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"{flag} {path}: no such readable file")
    if os.path.exists(cfg.data_dir) and not os.path.isdir(cfg.data_dir):
        raise ValueError(f"--data-dir {cfg.data_dir}: exists and is not a directory")
    if cfg.port:
        _probe_port(cfg.host, cfg.port)


def _probe_port(host: str, port: int) -> None:
    """ValueError if host:port cannot be bound (in use, or not a local address): said in
    one line before gRPC would log its own multi-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise ValueError(f"--host {host} --port {port}: cannot bind ({e.strerror})") from None


def start_server(cfg: ServerConfig) -> RunningServer:
    """Recover the rounds from the log, bind, and start serving; returns the running server.

    Refused before binding: plaintext on a non-loopback address, bad limits or options."""
    check_config(cfg)
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {cfg.device!r}; e.g. cpu, cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    tokens = load_tokens(cfg.tokens_file) if cfg.tokens_file else None
    admin = None
    if cfg.admin_token_file or not (tokens and "operator" in tokens.values()):
        admin = admin_token(cfg.data_dir, cfg.admin_token_file)
    auth = Authenticator(tokens, admin)
    store = Store(cfg.data_dir)
    try:
        book = RoundBook(store, cfg.device, cfg.policy(), cfg.limits.max_clients_per_round)
        for config in cfg.rounds:
            try:
                book.get(config.round_id)  # already in the log from a previous run
            except AggregationError:
                book.open(config)
    except Exception as e:
        store.close()
        if isinstance(e, ValueError | StoreError):
            raise
        raise StoreError(f"{store.path}: cannot replay the log: {e}") from None
    metrics = Metrics()
    metrics.add("fedquant_log_rows_quarantined_total", len(book.problems))
    servicer = AggregatorServicer(book, auth, metrics, cfg.limits, cfg.decode_slots,
                                  cfg.workers)
    book.on_close = servicer.round_closed

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="grpc-aio")
    thread.start()
    servicer.loop = loop

    async def serve():
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # no port sharing: a second server on the same port must fail, not split traffic
            ("grpc.so_reuseport", 0)])
        pb_grpc.add_AggregatorServicer_to_server(servicer, server)
        health_servicer = HealthServicer()
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
        await server.start()
        for name in ("", SERVICE):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        return server, port, health_servicer

    try:
        server, port, health_servicer = asyncio.run_coroutine_threadsafe(
            serve(), loop).result(60)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        servicer.decoder.shutdown()
        servicer.io.shutdown()
        store.close()
        raise

    stop = threading.Event()
    extras: list = []

    def close_deadlines():
        while not stop.wait(0.05):
            try:
                book.close_expired()
            except Exception:  # keep closing the other rounds' deadlines
                log.exception("deadline_close_failed")

    threading.Thread(target=close_deadlines, daemon=True, name="deadlines").start()
    if cfg.metrics_port is not None:
        def render():
            return metrics.render({
                "fedquant_rounds_open": len(book.open_rounds()),
                "fedquant_rounds": book.store.round_count(),
                "fedquant_push_streams": servicer.gate.streams,
                "fedquant_push_buffered_bytes": servicer.gate.buffered})
        extras.append(serve_metrics(render, cfg.host, cfg.metrics_port))
    return RunningServer(port, book, metrics, servicer, server, health_servicer, loop, thread,
                         stop, extras)
