"""Rounds: their configuration, state and running sums, backed by the durable log.

A round is opened with a codec, a round seed, the tensor shape, the expected cohort, a
quorum and a deadline. Each accepted push is decoded by the codec's fast path
(``codec.decode_sum([enc], [w])``) and added to the round's float64 running sum by
``fedquant.mean.accumulate``, the add ``fq.decode_mean`` makes, so an open
round holds O(d) memory whatever the number of clients. When the clients share one rotation
(QUIC-FL with a round_seed), pushes are summed in the rotated domain instead and the round
pays a single inverse rotation at close (the RHT paper section 5). The round closes on quorum,
on deadline or on an operator call; closing stores the float32 mean ``sum / total_weight``
in the log, and the closed round leaves memory (it is read back from the log on demand).

Correlated rounds (:func:`is_stratified` codecs: correlated quantization, Suresh et al.,
"Correlated quantization for distributed mean estimation and optimization", ICML 2022,
https://proceedings.mlr.press/v162/suresh22a.html): every client encodes with the round
seed itself and its own stratum in 0..clients-1 (the payload's "client" section); the
round's ``clients`` must equal its expected count or cohort size when those are set, and a
stratum is accepted at most once per round. Each push is still decoded on its own, so the
mean is the plain weighted ``fq.decode_mean`` of the accepted payloads.

Robustness: every push is decoded on its own before it is added, so a bad client is
attributed and refused alone: a decode that fails or holds NaN/Inf, or an update whose norm
exceeds the round's :class:`fedquant.robust.NormPolicy` bound, is rejected with its reason
recorded (``Store.rejections``); with ``action="clip"`` it is scaled down to the bound
instead. A push is judged when it arrives against the norms accepted so far, and the round
is judged again at close against the median of all its norms: a push that fails that final
check (an outlier that came first, before there was a median) is taken out by re-summing the
round from the log without it, so the order of arrival gives an attacker nothing. Weights
are bounded (``MAX_WEIGHT``) so the total weight stays finite. Replay re-checks every logged payload
(digest, round, codec, shape, seed, decode) and quarantines a bad row instead of refusing
to start.

This module knows nothing of gRPC: problems are raised as :class:`AggregationError` with
the name of the gRPC status code the servicer should return.

Example::

    book = RoundBook(Store("data"))
    book.open(RoundConfig.from_dict({"id": "r1", "codec": "eden", "params": {"bits": 2},
                                     "round_seed": 1, "shape": [1024], "expected": 10}))
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

import fedquant as fq
from fedquant.codecs.base import codec_class
from fedquant.mean import accumulate
from fedquant.robust import NormPolicy, Verdict, update_norm
from fedquant.rotation import padded_size, unrotate
from fedquant.server.store import Store, StoreError

log = logging.getLogger("fedquant.server")

ROUND_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
MAX_CLIENT_ID = 2**64 - 1
ADD_BLOCK = 1 << 17  # elements per block when dividing the running sum into the mean
MAX_DEADLINE_S = 7 * 24 * 3600.0  # a round's deadline: at most a week after opening
MAX_COHORT = 10_000  # client ids in a cohort, and clients in any one round
MAX_WEIGHT = 2.0**53  # a push's weight; MAX_COHORT of them sum to a finite total
_CONFIG_KEYS = ("id", "codec", "params", "round_seed", "shape", "cohort", "expected",
                "quorum", "deadline_s")


class AggregationError(Exception):
    """A request the server refuses; `status` names the gRPC status code to return."""

    def __init__(self, status: str, message: str, digest: str = ""):
        super().__init__(message)
        self.status = status
        self.digest = digest  # for ALREADY_EXISTS: sha256 of the push already recorded


def payload_digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def parse_payload(payload: bytes | bytearray) -> fq.Encoded:
    """A push's payload, validated (fq.WireError if malformed).

    No expansion cap: a round's shape is the operator's choice and ``check_payload`` holds
    every payload to it before anything is decoded, so a tiny payload of a sparse codec
    for a large round (rand-k keeping a few coordinates) is legitimate here."""
    return fq.Encoded.from_bytes(payload, max_expansion=math.inf)


@dataclass(frozen=True)
class RoundConfig:
    """What a round expects; `params` is the codec's canonical wire params."""

    round_id: str
    codec: str
    params: dict[str, str]
    round_seed: int
    shape: tuple[int, ...]
    cohort: tuple[int, ...] = ()
    expected_count: int = 0
    quorum: int = 0
    deadline_unix: float = 0.0
    opened_unix: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def build(cls, round_id: str, codec: str, params: dict, round_seed: int,
              shape: list[int] | tuple[int, ...], cohort: list[int] | tuple[int, ...] = (),
              expected_count: int = 0, quorum: int = 0, deadline_s: float = 0.0,
              now: float | None = None) -> RoundConfig:
        """Validate and canonicalize; ValueError names the bad field."""
        if not isinstance(round_id, str) or not ROUND_ID.fullmatch(round_id):
            raise ValueError(f"round id must be 1..128 chars of [A-Za-z0-9_.-], got {round_id!r}")
        klass = codec_class(codec)  # ValueError lists the available codecs
        text = {str(k): fq.codecs.base._to_text(v) for k, v in dict(params).items()}
        instance = klass.from_params(text)
        canonical = instance.wire_params()
        if not isinstance(round_seed, int) or not 0 <= round_seed <= MAX_CLIENT_ID:
            raise ValueError(f"round_seed must be an integer in [0, 2^64), got {round_seed!r}")
        shape = tuple(shape)
        if not 1 <= len(shape) <= fq.wire.MAX_DIMS or any(
                not isinstance(n, int) or n < 1 for n in shape):
            raise ValueError(f"shape must be 1..{fq.wire.MAX_DIMS} positive integers, "
                             f"got {list(shape)}")
        if math.prod(shape) > 2**31:
            raise ValueError(f"shape {list(shape)} exceeds 2^31 elements")
        if len(cohort) > MAX_COHORT:
            raise ValueError(f"cohort has {len(cohort)} client ids; at most {MAX_COHORT}")
        cohort = tuple(sorted(set(cohort)))
        if any(not isinstance(c, int) or not 0 <= c <= MAX_CLIENT_ID for c in cohort):
            raise ValueError("cohort must be client ids in [0, 2^64)")
        expected = len(cohort) or int(expected_count)
        quorum = int(quorum) or expected
        if expected < 0 or quorum < 0:
            raise ValueError("expected and quorum must be non-negative")
        if expected > MAX_COHORT or quorum > MAX_COHORT:
            raise ValueError(f"expected and quorum must be at most {MAX_COHORT}, got "
                             f"{expected} and {quorum}")
        if cohort and quorum > len(cohort):
            raise ValueError(f"quorum {quorum} exceeds the cohort size {len(cohort)}")
        if is_stratified(instance) and expected and instance.clients != expected:
            raise ValueError(f"codec {codec} has clients={instance.clients} strata but the "
                             f"round expects {expected} clients (cohort size or expected): "
                             "they must be equal")
        if not math.isfinite(deadline_s) or not 0 <= deadline_s <= MAX_DEADLINE_S:
            raise ValueError(f"deadline_s must be in [0, {MAX_DEADLINE_S:g}] (a week), "
                             f"got {deadline_s}")
        now = time.time() if now is None else now
        return cls(round_id, codec, canonical, round_seed, shape, cohort, expected, quorum,
                   now + deadline_s if deadline_s else 0.0, now)

    @classmethod
    def from_dict(cls, spec: dict) -> RoundConfig:
        """From a TOML ``[[round]]`` table: id, codec, params, round_seed, shape, cohort,
        expected, quorum, deadline_s. ValueError names unknown keys."""
        unknown = set(spec) - set(_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown round key(s) {sorted(unknown)}; "
                             f"allowed: {list(_CONFIG_KEYS)}")
        for key in ("id", "codec", "shape"):
            if key not in spec:
                raise ValueError(f"round key '{key}' is required")
        codec, params = spec["codec"], spec.get("params", {})
        if not isinstance(params, dict):
            raise ValueError(f"round {spec.get('id')!r}: params must be a table, "
                             f"got {params!r}")
        if isinstance(codec, str) and ":" in codec:  # the codec spec "eden:bits=2,..."
            codec, spec_params = fq.parse_codec_spec(codec)
            both = sorted(set(spec_params) & set(params))
            if both:
                raise ValueError(f"round {spec.get('id')!r}: {both} set both in the codec spec "
                                 "and in params")
            params = {**spec_params, **params}
        try:
            return cls.build(spec["id"], codec, params,
                             spec.get("round_seed", 0), list(spec["shape"]),
                             list(spec.get("cohort", ())), int(spec.get("expected", 0)),
                             int(spec.get("quorum", 0)), float(spec.get("deadline_s", 0.0)))
        except TypeError as e:
            raise ValueError(f"round {spec.get('id')!r}: a value has the wrong type ({e}); "
                             "expected id, codec: str; params: table; round_seed, expected, "
                             "quorum: int; shape, cohort: lists of int; deadline_s: "
                             "number") from None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RoundConfig:
        return cls(**{**data, "shape": tuple(data["shape"]), "cohort": tuple(data["cohort"])})


@dataclass(frozen=True)
class Contribution:
    """One push's estimate times `weight`: flat, or in the rotated domain of `rotation`
    (rotation seed, number of RHTs) and padded, to be unrotated once at close."""

    values: torch.Tensor
    rotation: tuple[int, int] | None = None
    weight: float = 1.0  # still to multiply by, as the values are added to the sum


def is_stratified(codec: fq.Codec) -> bool:
    """Whether the codec's clients share the round seed and each send its own stratum
    (correlated quantization): it has an integer ``clients`` and reads a payload's stratum
    with ``client_of(enc)``."""
    clients = getattr(codec, "clients", None)
    return (isinstance(clients, int) and not isinstance(clients, bool)
            and callable(getattr(codec, "client_of", None)))


def shares_rotation(codec: fq.Codec) -> bool:
    """Whether all of a round's clients share the codec's rotation, so that their estimates
    can be summed before one inverse rotation: the codec offers ``accumulate(out, enc, w)``
    into the rotated domain and ``rotation_seed(client_seed)`` ignores the client seed
    (QUIC-FL with a round_seed)."""
    return (callable(getattr(codec, "accumulate", None))
            and callable(getattr(codec, "rotation_seed", None))
            and codec.rotation_seed(1) == codec.rotation_seed(2))


@dataclass(frozen=True)
class PushRecord:
    weight: float
    nbytes: int
    sha256: str


@dataclass
class Round:
    """A round's mutable state; every field below `config` is guarded by `lock`."""

    config: RoundConfig
    state: str = "open"  # "open" or "closed"
    close_reason: str = ""
    pushes: dict[int, PushRecord] = field(default_factory=dict)
    # Pushes being logged (client -> sha256): the round lock is not held during the fsync,
    # so that concurrent pushes share one group commit; closing waits until none is left.
    pending: dict[int, str] = field(default_factory=dict)
    closing: bool = False  # an operator or deadline close waits for `pending` to drain
    next_seq: int = 0  # arrival order of the next logged push
    running_sum: torch.Tensor | None = None  # float64, flat; None once closed
    # Rotated-domain sums of codecs with a shared rotation, by (rotation seed, count).
    rotated_sums: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    total_weight: float = 0.0
    bytes_received: int = 0
    decode_seconds: float = 0.0
    norms: dict[int, float] = field(default_factory=dict)  # client -> update norm (unclipped)
    factors: dict[int, float] = field(default_factory=dict)  # client -> clip factor applied
    rejected: dict[int, str] = field(default_factory=dict)  # client -> reason
    # Correlated rounds: stratum -> client id, of the accepted and the pending pushes.
    strata: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.drained = threading.Condition(self.lock)  # notified when a pending push ends

    @property
    def round_id(self) -> str:
        return self.config.round_id

    @functools.cached_property
    def codec(self) -> fq.Codec:
        """The round's codec (every accepted payload carries exactly its name and params)."""
        return codec_class(self.config.codec).from_params(dict(self.config.params))


class RoundBook:
    """All rounds of one server; rebuilds open rounds' running sums from the log on start.

    Args:
        store (Store): the durable log.
        device (str | None): where pushes are decoded and summed.
        policy (NormPolicy, default no bound): the norm screening of updates.
        max_clients (int, default MAX_COHORT): pushes any one round accepts.
        on_close (callable | None): called with the round id after a round closed (from
            whichever thread closed it).
    """

    def __init__(self, store: Store, device: torch.device | str | None = None,
                 policy: NormPolicy | None = None, max_clients: int = MAX_COHORT,
                 on_close=None):
        self.store = store
        self.device = device
        self.policy = policy or NormPolicy()
        self.max_clients = max_clients
        self.on_close = on_close
        self._rounds: dict[str, Round] = {}  # open rounds only: closed ones are in the log
        self._lock = threading.Lock()
        self.problems: list[str] = []  # one line per quarantined row, for the start-up log
        for logged in store.rounds(state="open"):
            try:
                if logged.config is None:
                    raise ValueError("not valid JSON")
                config = RoundConfig.from_json(logged.config)
            except (TypeError, ValueError) as e:
                reason = f"the round's config is invalid: {e}"
                self._report(logged.round_id, None, reason)
                store.quarantine_round(logged.round_id, reason)
                continue
            rnd = Round(config)
            self._rounds[rnd.round_id] = rnd
            rnd.rejected = store.rejections(rnd.round_id)
            for push in store.pushes(rnd.round_id):
                self._replay(rnd, push)
            if rnd.config.quorum and len(rnd.pushes) >= rnd.config.quorum:
                # The server died between logging the quorum's last push and the close.
                self._close_locked(rnd, "quorum")
            log.info("round_restored", extra={"fields": {
                "round": rnd.round_id, "state": rnd.state, "pushes": len(rnd.pushes)}})

    def _replay(self, rnd: Round, push) -> None:
        """Add one logged push back into its round, or quarantine it naming the reason."""
        try:
            if payload_digest(push.payload) != push.sha256:
                raise AggregationError("DATA_LOSS", "payload does not match its sha256")
            if not (math.isfinite(push.weight) and 0 < push.weight <= MAX_WEIGHT):
                raise AggregationError("DATA_LOSS", f"weight {push.weight} out of range")
            if push.client_id < 0 or push.client_id in rnd.pushes:
                raise AggregationError("DATA_LOSS", "bad or repeated client id")
            try:
                enc = parse_payload(push.payload)
            except fq.WireError as e:
                raise AggregationError("DATA_LOSS", f"malformed payload: {e}") from None
            if rnd.config.cohort and push.client_id not in rnd.config.cohort:
                raise AggregationError("DATA_LOSS", "client not in the round's cohort")
            self.check_payload(rnd, push.client_id, enc)  # another round's payload fails here
            stratum = self.stratum_of(rnd, enc)
            contribution = self.decode(rnd, enc, push.weight)
            norm = contribution_norm(contribution, push.weight)
            if not math.isfinite(norm):
                raise AggregationError("DATA_LOSS", "decoded update holds NaN or Inf")
            if not (math.isfinite(push.factor) and 0 <= push.factor <= 1):
                raise AggregationError("DATA_LOSS", f"clip factor {push.factor} out of range")
        except AggregationError as e:
            self._report(rnd.round_id, push.client_id, str(e))
            self.store.quarantine(rnd.round_id, push.key or push.client_id, str(e))
            return
        rnd.pushes[push.client_id] = PushRecord(push.weight, push.nbytes, push.sha256)
        if stratum is not None:
            rnd.strata[stratum] = push.client_id
        rnd.norms[push.client_id] = norm
        rnd.factors[push.client_id] = push.factor
        rnd.bytes_received += push.nbytes
        rnd.next_seq += 1
        if push.factor > 0:  # 0: screened out at close, kept in the log as a record
            self._add(rnd, scaled(contribution, push.factor))
            rnd.total_weight += push.weight

    def _report(self, round_id: str, client_id: int | None, reason: str) -> None:
        line = f"round {round_id!r}" + ("" if client_id is None else f", client {client_id}")
        self.problems.append(f"{line}: {reason}")
        log.warning("log_row_quarantined", extra={"fields": {
            "round": round_id, "client": client_id, "reason": reason}})

    # ---- lookup and opening ------------------------------------------------------------
    def get(self, round_id: str) -> Round:
        """The round: open rounds from memory, closed ones read back from the log."""
        with self._lock:
            rnd = self._rounds.get(round_id)
        if rnd is not None:
            return rnd
        logged = self.store.round(round_id) if ROUND_ID.fullmatch(round_id or "") else None
        if logged is None or logged.config is None or logged.state != "closed":
            raise AggregationError("NOT_FOUND", f"round {round_id!r} does not exist")
        rnd = Round(RoundConfig.from_json(logged.config), "closed", logged.close_reason)
        for push in self.store.pushes(round_id, with_payload=False):
            rnd.pushes[push.client_id] = PushRecord(push.weight, push.nbytes, push.sha256)
            rnd.total_weight += push.weight
            rnd.bytes_received += push.nbytes
        rnd.rejected = self.store.rejections(round_id)
        rnd.closed.set()
        return rnd

    def get_open(self, round_id: str) -> Round | None:
        """The open round of this id from memory, or None (closed, unknown): no log read."""
        with self._lock:
            return self._rounds.get(round_id)

    def round_ids(self) -> list[str]:
        """Ids of the open rounds (those in memory)."""
        with self._lock:
            return list(self._rounds)

    def open_rounds(self) -> list[Round]:
        with self._lock:
            return [r for r in self._rounds.values() if r.state == "open"]

    def open(self, config: RoundConfig) -> Round:
        with self._lock:
            if config.round_id in self._rounds:
                raise AggregationError("ALREADY_EXISTS",
                                       f"round {config.round_id!r} already exists")
            try:
                self.store.add_round(config.round_id, config.to_json())
            except sqlite3.IntegrityError:
                raise AggregationError("ALREADY_EXISTS",
                                       f"round {config.round_id!r} already exists") from None
            rnd = Round(config)
            self._rounds[config.round_id] = rnd
        log.info("round_opened", extra={"fields": {
            "round": config.round_id, "codec": config.codec, "params": config.params,
            "shape": list(config.shape), "quorum": config.quorum,
            "deadline_unix": config.deadline_unix}})
        return rnd

    # ---- pushes ------------------------------------------------------------------------
    def check_push(self, rnd: Round, client_id: int) -> None:
        """Reject a push early (before receiving its bytes) when it cannot be accepted."""
        cfg = rnd.config
        if cfg.cohort and client_id not in cfg.cohort:
            raise AggregationError("FAILED_PRECONDITION", f"client {client_id} is not in the "
                                   f"cohort of round {cfg.round_id!r}")
        with rnd.lock:
            self._check_open_and_new(rnd, client_id)

    def _check_open_and_new(self, rnd: Round, client_id: int) -> None:
        if client_id in rnd.pushes:
            digest = rnd.pushes[client_id].sha256
            raise AggregationError("ALREADY_EXISTS", f"client {client_id} already pushed to "
                                   f"round {rnd.round_id!r} (sha256 {digest})", digest)
        if rnd.state != "open":
            raise AggregationError("FAILED_PRECONDITION", f"round {rnd.round_id!r} is closed "
                                   f"({rnd.close_reason})")
        if rnd.closing:
            raise AggregationError("FAILED_PRECONDITION", f"round {rnd.round_id!r} is closing")
        # Not yet durable, so not final: a retry is told to come back (UNAVAILABLE) rather
        # than counted as done before the push it repeats is in the log.
        if client_id in rnd.pending:
            raise AggregationError("UNAVAILABLE", f"client {client_id}'s push to round "
                                   f"{rnd.round_id!r} is being recorded; retry")
        if len(rnd.pushes) + len(rnd.pending) >= self.max_clients:
            raise AggregationError("RESOURCE_EXHAUSTED", f"round {rnd.round_id!r} already "
                                   f"holds the most pushes a round may ({self.max_clients})")
        quorum = rnd.config.quorum
        if quorum and len(rnd.pushes) + len(rnd.pending) >= quorum:
            raise AggregationError("UNAVAILABLE", f"round {rnd.round_id!r} is recording the "
                                   f"last pushes of its quorum of {quorum}; retry")

    def check_payload(self, rnd: Round, client_id: int, enc: fq.Encoded) -> None:
        """FAILED_PRECONDITION unless the payload is what the round expects."""
        cfg = rnd.config
        if enc.codec != cfg.codec or enc.params != cfg.params:
            raise AggregationError("FAILED_PRECONDITION", f"payload codec {enc.codec}"
                                   f"{enc.params} does not match round {cfg.round_id!r}'s "
                                   f"{cfg.codec}{cfg.params}")
        if tuple(enc.shape) != cfg.shape:
            raise AggregationError("FAILED_PRECONDITION", f"payload shape {list(enc.shape)} "
                                   f"does not match round {cfg.round_id!r}'s {list(cfg.shape)}")
        if is_stratified(rnd.codec):
            if enc.seed != cfg.round_seed:
                raise AggregationError("FAILED_PRECONDITION", f"payload seed {enc.seed} is not "
                                       f"the round seed {cfg.round_seed}: the clients of a "
                                       f"{cfg.codec} round all encode with the round seed")
            stratum = self.stratum_of(rnd, enc)
            with rnd.lock:
                owner = rnd.strata.get(stratum)
            if owner is not None and owner != client_id:
                raise AggregationError("FAILED_PRECONDITION", _stratum_taken(rnd, stratum,
                                                                             owner))
            return
        expected_seed = fq.random.derive_seed(cfg.round_seed, client_id)
        if enc.seed != expected_seed:
            raise AggregationError("FAILED_PRECONDITION", f"payload seed {enc.seed} is not "
                                   f"derive_seed(round_seed, {client_id}) = {expected_seed}")

    def stratum_of(self, rnd: Round, enc: fq.Encoded) -> int | None:
        """The payload's stratum in a correlated round (INVALID_ARGUMENT if its "client"
        section is missing or out of 0..clients-1), None in any other round."""
        if not is_stratified(rnd.codec):
            return None
        try:
            return rnd.codec.client_of(enc)
        except (fq.WireError, KeyError, ValueError) as e:
            raise AggregationError("INVALID_ARGUMENT", f"payload stratum: {e}") from None

    def decode(self, rnd: Round, enc: fq.Encoded, weight: float) -> Contribution:
        """weight * decode(enc) as a float64 contribution to the round's sum.

        Codecs whose clients share one rotation (QUIC-FL with a round_seed) contribute in
        the rotated domain, so the round pays one inverse rotation at close instead of one
        per push; every other codec goes through its ``decode_sum`` fast path.
        """
        codec = rnd.codec  # check_payload made sure enc carries the round's codec and params
        if shares_rotation(codec):
            rotated = torch.zeros(padded_size(enc.numel), dtype=torch.float64,
                                  device=self.device)
            codec.accumulate(rotated, enc, weight)
            return Contribution(rotated, (codec.rotation_seed(enc.seed), enc.rotations))
        if type(codec).decode_sum is fq.Codec.decode_sum:
            # The generic decode_sum of one push is decode() with two float64 round trips;
            # skip them: the weight is applied as the float32 values are added in float64.
            part = codec.decode(enc, self.device)
            return Contribution(part.reshape(-1)[: rnd.config.numel], weight=weight)
        part = codec.decode_sum([enc], [weight], self.device)
        return Contribution(part.reshape(-1)[: rnd.config.numel].to(torch.float64))

    def judge(self, rnd: Round, contribution: Contribution, weight: float) -> Verdict:
        """The norm verdict on one decoded push, against the norms accepted so far."""
        norm = contribution_norm(contribution, weight)
        with rnd.lock:
            others = [n for c, n in rnd.norms.items() if rnd.factors.get(c, 1.0) > 0]
        return self.policy.judge(norm, others)

    def reject(self, rnd: Round, client_id: int, reason: str) -> None:
        """Record that the round refused this client's push (the round's record, logged)."""
        with rnd.lock:
            rnd.rejected[client_id] = reason
        self.store.record_rejection(rnd.round_id, client_id, reason)
        log.warning("push_screened_out", extra={"fields": {
            "round": rnd.round_id, "client": client_id, "reason": reason}})

    def accept(self, rnd: Round, client_id: int, weight: float, payload: bytes, digest: str,
               contribution: Contribution, decode_seconds: float,
               close_on_quorum: bool = True, verdict: Verdict | None = None,
               stratum: int | None = None) -> tuple[int, str]:
        """Durably log the push, then add it to the running sum; returns (pushes, state).

        With ``close_on_quorum=False`` the push that completes the quorum leaves the round
        "closing" (no push can join any more) and the caller closes it with :meth:`close`,
        e.g. after acknowledging the push: that push is durable already, the close (mean
        file, its fsync) need not delay its acknowledgment.

        The round lock is released while the row is logged, so that concurrent pushes share
        one group commit (see ``Store.record_push``); the push is marked pending meanwhile,
        which keeps duplicates and pushes beyond the quorum out, and makes a close wait.

        `verdict` (from :meth:`judge`) carries the update's norm and clip factor; None
        judges it here. A rejected verdict raises FAILED_PRECONDITION and logs nothing.

        `stratum` (from :meth:`stratum_of`; None reads it from the payload): in a correlated
        round, the push's stratum, refused with FAILED_PRECONDITION if another push holds it.
        """
        if not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
            raise AggregationError("INVALID_ARGUMENT", f"weight must be in (0, {MAX_WEIGHT:g}]"
                                   f", got {weight}")
        verdict = verdict or self.judge(rnd, contribution, weight)
        if not verdict.accepted:
            raise AggregationError("FAILED_PRECONDITION", f"update rejected: {verdict.reason}")
        if stratum is None and is_stratified(rnd.codec):
            stratum = self.stratum_of(rnd, parse_payload(payload))
        with rnd.lock:
            self._check_open_and_new(rnd, client_id)
            if stratum is not None:
                owner = rnd.strata.get(stratum)
                if owner is not None and owner != client_id:
                    raise AggregationError("FAILED_PRECONDITION",
                                           _stratum_taken(rnd, stratum, owner))
                rnd.strata[stratum] = client_id
            rnd.pending[client_id] = digest
            seq, rnd.next_seq = rnd.next_seq, rnd.next_seq + 1
        try:
            # Log first: the push is acknowledged only once it is durable.
            self.store.record_push(rnd.round_id, client_id, weight, digest, payload, seq,
                                   verdict.factor)
        except BaseException as e:
            with rnd.lock:
                del rnd.pending[client_id]
                if stratum is not None:
                    rnd.strata.pop(stratum, None)
                rnd.drained.notify_all()
            if isinstance(e, sqlite3.IntegrityError):
                raise AggregationError("ALREADY_EXISTS", f"client {client_id} already pushed "
                                       f"to round {rnd.round_id!r}") from None
            if isinstance(e, sqlite3.Error):
                raise AggregationError("UNAVAILABLE", f"could not log the push: {e}") from None
            raise
        with rnd.lock:
            del rnd.pending[client_id]
            rnd.pushes[client_id] = PushRecord(weight, len(payload), digest)
            rnd.norms[client_id] = verdict.norm
            rnd.factors[client_id] = verdict.factor
            self._add(rnd, scaled(contribution, verdict.factor))
            rnd.total_weight += weight
            rnd.bytes_received += len(payload)
            rnd.decode_seconds += decode_seconds
            if rnd.config.quorum and len(rnd.pushes) >= rnd.config.quorum:
                if close_on_quorum:
                    self._close_locked(rnd, "quorum")
                else:
                    rnd.closing = True
            rnd.drained.notify_all()
            return len(rnd.pushes), "closing" if rnd.closing else rnd.state

    @staticmethod
    def _add(rnd: Round, contribution: Contribution) -> None:
        key, values = contribution.rotation, contribution.values
        total = rnd.running_sum if key is None else rnd.rotated_sums.get(key)
        if total is None:
            total = torch.zeros_like(values, dtype=torch.float64)
            if key is None:
                rnd.running_sum = total
            else:
                rnd.rotated_sums[key] = total
        # The library's one add (the path fq.decode_mean takes): total += weight * values
        # in float64, one pass with no float64 copy of float32 values on the CPU.
        accumulate(total, values, contribution.weight)

    # ---- closing -----------------------------------------------------------------------
    def close(self, rnd: Round, reason: str) -> None:
        """Close an open round once the pushes being logged are in its sum (no push is
        logged without being counted); new pushes are refused meanwhile."""
        with rnd.lock:
            if rnd.state != "open":
                return
            rnd.closing = True
            while rnd.pending:
                rnd.drained.wait()
            if rnd.state == "open":  # the last pending push may have closed it on quorum
                self._close_locked(rnd, reason)

    def close_expired(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for rnd in self.open_rounds():
            if rnd.config.deadline_unix and now >= rnd.config.deadline_unix:
                self.close(rnd, "deadline")

    def _final_screening(self, rnd: Round) -> None:
        """Judge every push again against the median of all the round's norms (caller
        holds the round lock); if a verdict changed, re-sum the round from the log."""
        if not math.isfinite(self.policy.median_multiple) or not rnd.norms:
            return
        bound, rule = self.policy.bound_and_rule(rnd.norms.values())
        final = {c: self.policy.verdict(n, bound, rule) for c, n in rnd.norms.items()}
        changed = {c: v for c, v in final.items() if v.factor < rnd.factors.get(c, 1.0)}
        if not changed:
            return
        for client, verdict in changed.items():
            reason = f"{verdict.reason}, judged at close"
            if verdict.factor == 0:
                rnd.rejected[client] = reason
                self.store.record_rejection(rnd.round_id, client, reason)
            self.store.set_factor(rnd.round_id, client, verdict.factor)
            rnd.factors[client] = verdict.factor
            log.warning("push_screened_out_at_close", extra={"fields": {
                "round": rnd.round_id, "client": client, "reason": reason}})
        rnd.running_sum, rnd.rotated_sums, rnd.total_weight = None, {}, 0.0
        for push in self.store.pushes(rnd.round_id):
            factor = rnd.factors.get(push.client_id, 0.0)
            if factor <= 0 or push.client_id not in rnd.pushes:
                continue
            enc = parse_payload(push.payload)  # checked when it was accepted
            self._add(rnd, scaled(self.decode(rnd, enc, push.weight), factor))
            rnd.total_weight += push.weight

    def _close_locked(self, rnd: Round, reason: str) -> None:
        self._final_screening(rnd)
        mean = None
        total = rnd.running_sum
        for (seed, rotations), rotated in rnd.rotated_sums.items():  # one unrotate per key
            part = unrotate(rotated.to(torch.float32), seed, rotations, rnd.config.numel)
            # a new float64 sum: the round's own sums stay as they are until it is closed
            total = (torch.zeros(part.shape, dtype=torch.float64, device=part.device)
                     if total is None else total.clone())
            accumulate(total, part)
        if total is not None and rnd.total_weight > 0:
            mean = torch.empty(total.shape, dtype=torch.float32, device=total.device)
            for start in range(0, total.numel(), ADD_BLOCK):  # no d-sized float64 temporary
                block = slice(start, start + ADD_BLOCK)
                torch.div(total[block], rnd.total_weight, out=mean[block])
            mean = mean.cpu().numpy().astype("<f4", copy=False).tobytes()
        self.store.close_round(rnd.round_id, reason, mean)
        rnd.state, rnd.close_reason, rnd.running_sum = "closed", reason, None
        rnd.rotated_sums = {}
        rnd.closed.set()
        with self._lock:  # the log has it now: a closed round leaves memory
            if self._rounds.get(rnd.round_id) is rnd:
                del self._rounds[rnd.round_id]
        if self.on_close is not None:
            self.on_close(rnd.round_id)
        log.info("round_closed", extra={"fields": {
            "round": rnd.round_id, "reason": reason, "pushes": len(rnd.pushes),
            "bytes": rnd.bytes_received, "total_weight": rnd.total_weight,
            "decode_seconds": round(rnd.decode_seconds, 6)}})

    def mean(self, rnd: Round) -> torch.Tensor | None:
        """The closed round's float32 mean (flat), or None if it closed with no pushes."""
        try:
            blob = self.store.mean(rnd.round_id)
        except StoreError as e:
            raise AggregationError("DATA_LOSS", str(e)) from None
        if blob is None:
            return None
        mean = torch.frombuffer(bytearray(blob), dtype=torch.float32)
        if mean.numel() != rnd.config.numel:
            raise AggregationError("DATA_LOSS", f"the stored mean of round {rnd.round_id!r} "
                                   f"has {mean.numel()} values, expected {rnd.config.numel}")
        if not bool(torch.isfinite(mean).all()):
            raise AggregationError("DATA_LOSS", f"the stored mean of round {rnd.round_id!r} "
                                   "holds NaN or Inf")
        return mean


def _stratum_taken(rnd: Round, stratum: int, owner: int) -> str:
    return (f"stratum {stratum} of round {rnd.round_id!r} is already used by client {owner}; "
            f"each client of a {rnd.config.codec} round needs its own stratum in "
            f"0..clients-1")


def contribution_norm(contribution: Contribution, weight: float) -> float:
    """The L2 norm of the update behind a contribution (weight * update, possibly in a
    rotated domain: the RHTs are orthonormal, so the norm is the same); inf if it holds
    NaN or Inf."""
    return update_norm(contribution.values) * abs(contribution.weight) / weight


def scaled(contribution: Contribution, factor: float) -> Contribution:
    """The contribution times a clip factor (applied as the values are added)."""
    if factor == 1.0:
        return contribution
    return Contribution(contribution.values, contribution.rotation,
                        contribution.weight * factor)
