"""The client of the gRPC aggregation server (``server/aggregator.py``).

It encodes a tensor with the round's codec and the seed ``derive_seed(round_seed,
client_id)``, streams the serialized update in 1 MiB chunks (so updates above gRPC's 4 MiB
message limit work), retries on UNAVAILABLE with exponential backoff, and fetches the mean.
Retrying is idempotent: a second push of a client is answered ALREADY_EXISTS with the
digest of the recorded payload, which counts as success when it matches ours.
In a correlated round (correlated quantization, Suresh et al., ICML 2022,
https://proceedings.mlr.press/v162/suresh22a.html) every client encodes with the round seed
itself and its own stratum in 0..clients-1 (``stratum=``; by default the client's position
in the round's sorted cohort).
Opening and closing rounds needs the server's admin token (``token=``: the tokens file's
"operator" entry, or the one the server wrote to ``<data-dir>/admin.token``).

Example::

    with AggregatorClient("127.0.0.1:50051", insecure=True) as client:
        client.push_tensor("r1", client_id=3, x=grad)
        mean = client.get_mean("r1", wait_s=60)
"""

from __future__ import annotations

import hashlib
import math
import pathlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import torch

import fedquant as fq
from fedquant._proto import aggregator_pb2 as pb
from fedquant._proto import aggregator_pb2_grpc as pb_grpc

CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class PushResult:
    """What the server acknowledged (or had already recorded, on a retried push)."""

    round_id: str
    client_id: int
    nbytes: int
    sha256: str
    already_recorded: bool = False


class PushConflict(RuntimeError):
    """The server holds a different payload for this client and round."""


class AggregatorClient:
    """A connection to one aggregation server.

    Args:
        target (str): "host:port".
        insecure (bool, default False): plaintext channel (no TLS).
        root_cert (path | None): CA that signed the server's certificate (default: system).
        client_cert, client_key (path | None): this client's certificate for mutual TLS.
        token (str | None): bearer token, sent as ``authorization: Bearer <token>``.
        retries (int, default 5): extra attempts on UNAVAILABLE.
        backoff_s (float, default 0.2): first retry delay, doubled each time (cap 5 s).
        timeout_s (float, default 120): deadline of each call.
        chunk_bytes (int, default 1 MiB): bytes per Push chunk.
    """

    def __init__(self, target: str, *, insecure: bool = False,
                 root_cert: str | pathlib.Path | None = None,
                 client_cert: str | pathlib.Path | None = None,
                 client_key: str | pathlib.Path | None = None, token: str | None = None,
                 retries: int = 5, backoff_s: float = 0.2, timeout_s: float = 120.0,
                 chunk_bytes: int = CHUNK_BYTES, server_name: str | None = None):
        if chunk_bytes < 1 or chunk_bytes > 3 * 1024 * 1024:
            raise ValueError(f"chunk_bytes must be in [1, 3 MiB], got {chunk_bytes}")
        if retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise ValueError("retries and backoff_s must be >= 0, timeout_s > 0")
        options = [("grpc.max_receive_message_length", 4 * 1024 * 1024)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if insecure:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(root_cert), private_key=_read(client_key),
                certificate_chain=_read(client_cert))
            self._channel = grpc.secure_channel(target, creds, options=options)
        self._stub = pb_grpc.AggregatorStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.chunk_bytes = chunk_bytes

    # ---- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AggregatorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- rounds ------------------------------------------------------------------------
    def open_round(self, round_id: str, codec: str, params: dict | None = None, *,
                   round_seed: int = 0, shape: tuple[int, ...] | list[int] = (),
                   cohort: list[int] = (), expected: int = 0, quorum: int = 0,
                   deadline_s: float = 0.0) -> pb.RoundStatus:
        """Open a round (operator token needed when the server checks tokens)."""
        request = pb.OpenRoundRequest(
            round_id=round_id, codec=pb.CodecSpec(name=codec, params={
                k: fq.codecs.base._to_text(v) for k, v in (params or {}).items()}),
            round_seed=round_seed, shape=list(shape), cohort=list(cohort),
            expected_count=expected, quorum=quorum, deadline_s=deadline_s)
        return self._call(self._stub.OpenRound, request)

    def round_status(self, round_id: str) -> pb.RoundStatus:
        return self._call(self._stub.GetRound, pb.GetRoundRequest(round_id=round_id))

    def close_round(self, round_id: str) -> pb.RoundStatus:
        return self._call(self._stub.CloseRound, pb.CloseRoundRequest(round_id=round_id))

    def _call(self, method, request):
        return self._retry(lambda: method(request, timeout=self.timeout_s,
                                          metadata=self._metadata))

    # ---- pushing -----------------------------------------------------------------------
    def encode(self, round_id: str, client_id: int, x: torch.Tensor,
               stratum: int | None = None) -> fq.Encoded:
        """Encode `x` with the round's codec and this client's derived seed.

        In a correlated round (a codec with ``clients`` strata) the seed is the round seed
        and `stratum` (0..clients-1) this client's index; None takes the client's position
        in the round's sorted cohort, and is a ValueError when the round has no cohort.
        `stratum` is a ValueError in any other round."""
        status = self.round_status(round_id)
        if tuple(x.shape) != tuple(status.shape):
            raise ValueError(f"tensor shape {list(x.shape)} does not match round "
                             f"{round_id!r}'s shape {list(status.shape)}")
        params = dict(status.codec.params)
        klass = fq.codecs.codec_class(status.codec.name)
        if "clients" not in params:
            if stratum is not None:
                raise ValueError(f"a stratum is only for correlated rounds; round {round_id!r}"
                                 f" uses {status.codec.name}")
            codec = klass.from_params(params)
            return codec.encode(x, seed=fq.random.derive_seed(status.round_seed, client_id))
        if stratum is None:
            cohort = sorted(status.cohort)
            if client_id not in cohort:
                raise ValueError(f"round {round_id!r} is a correlated round: pass this client's "
                                 f"stratum in 0..{int(params['clients']) - 1} (the round has "
                                 + ("no cohort to take it from)" if not cohort else
                                    f"a cohort without client {client_id})"))
            stratum = cohort.index(client_id)
        codec = klass.from_params({**params, "client": str(stratum)})  # ValueError if out
        return codec.encode(x, seed=status.round_seed)

    def push_tensor(self, round_id: str, client_id: int, x: torch.Tensor,
                    weight: float = 1.0, stratum: int | None = None) -> PushResult:
        """Encode (see :meth:`encode`) and push `x`."""
        return self.push(round_id, client_id, self.encode(round_id, client_id, x, stratum),
                         weight)

    def push(self, round_id: str, client_id: int, update: fq.Encoded | bytes,
             weight: float = 1.0) -> PushResult:
        """Stream one encoded update; retried on UNAVAILABLE, idempotent by digest."""
        payload = update.to_bytes() if isinstance(update, fq.Encoded) else bytes(update)
        digest = hashlib.sha256(payload).hexdigest()
        header = pb.PushHeader(round_id=round_id, client_id=client_id, weight=weight,
                               total_bytes=len(payload))

        def attempt() -> PushResult:
            try:
                ack = self._stub.Push(self._chunks(header, payload), timeout=self.timeout_s,
                                      metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
                recorded = dict(e.trailing_metadata() or ()).get("fedquant-sha256")
                if recorded != digest:
                    raise PushConflict(f"round {round_id!r} already holds a different push "
                                       f"from client {client_id}: {e.details()}") from e
                return PushResult(round_id, client_id, len(payload), digest, True)
            if ack.sha256 != digest:  # the server recorded other bytes than we sent
                raise PushConflict(f"server acknowledged sha256 {ack.sha256}, sent {digest}")
            return PushResult(ack.round_id, ack.client_id, ack.bytes_received, ack.sha256)

        return self._retry(attempt)

    def _chunks(self, header: pb.PushHeader, payload: bytes) -> Iterator[pb.PushChunk]:
        view = memoryview(payload)
        yield pb.PushChunk(header=header, data=bytes(view[: self.chunk_bytes]))
        for start in range(self.chunk_bytes, len(payload), self.chunk_bytes):
            yield pb.PushChunk(data=bytes(view[start: start + self.chunk_bytes]))

    # ---- the mean ----------------------------------------------------------------------
    def get_mean(self, round_id: str, wait_s: float = 0.0) -> torch.Tensor:
        """The closed round's mean (float32, the round's shape); waits up to `wait_s`."""

        def attempt() -> torch.Tensor:
            stream = self._stub.GetMean(pb.GetMeanRequest(round_id=round_id, wait_s=wait_s),
                                        timeout=self.timeout_s + wait_s,
                                        metadata=self._metadata)
            shape, parts, expected_offset = None, [], 0
            for chunk in stream:
                if shape is None:
                    shape = tuple(chunk.shape)
                if chunk.offset != expected_offset or len(chunk.data) % 4:
                    raise ValueError(f"GetMean: bad chunk at offset {chunk.offset}")
                if expected_offset + len(chunk.data) // 4 > math.prod(shape):
                    raise ValueError(f"GetMean: more values than the shape {list(shape)}")
                parts.append(chunk.data)
                expected_offset += len(chunk.data) // 4
            if shape is None or expected_offset != math.prod(shape):
                raise ValueError(f"GetMean: got {expected_offset} values for shape {shape}")
            values = np.frombuffer(b"".join(parts), dtype="<f4").astype(np.float32)
            return torch.from_numpy(values).reshape(shape)

        return self._retry(attempt)

    # ---- retries -----------------------------------------------------------------------
    def _retry(self, attempt):
        for n in range(self.retries + 1):
            try:
                return attempt()
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or n == self.retries:
                    raise
            time.sleep(min(self.backoff_s * 2**n, 5.0))
        raise AssertionError("unreachable")


def _read(path: str | pathlib.Path | None) -> bytes | None:
    return None if path is None else pathlib.Path(path).read_bytes()
