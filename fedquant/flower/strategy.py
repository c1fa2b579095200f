"""``CompressedStrategy``: the server half of fedquant's Flower integration.

Wraps ANY ``flwr.serverapp.strategy.Strategy`` (FedAvg, FedAdam, FedProx, FedTrimmedAvg,
Flower's DP wrappers, your own). Each round it adds the codec spec and the round seed to
the train config, and before the inner strategy's ``aggregate_train`` it decodes every
compressed reply back into an ordinary ArrayRecord with the original keys, shapes and
dtypes (weights = global + decoded update), so the inner strategy sees exactly what it
would see without compression. A reply whose payload is malformed, of another codec or
parameters than the round's, carries the wrong seed, or decodes to non-finite values is
dropped and counted; it never fails the round for the others.

Codecs: EDEN (Vargaftik et al., ICML 2022, https://arxiv.org/abs/2108.08842), DRIVE
(Vargaftik et al., NeurIPS 2021, https://arxiv.org/abs/2105.08339), QUIC-FL (Ben Basat et
al., https://arxiv.org/abs/2205.13341) and the others of ``fq.available_codecs()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

import fedquant as fq
from fedquant.fl import (
    SEED_POLICIES,
    Payload,
    check_payload,
    client_seed,
    codec_for_round,
    round_seed,
    split_keys,
    unflatten_arrays,
)
from fedquant.fl.arrays import DEFAULT_RAW_PATTERNS
from fedquant.flower import keys
from fedquant.robust import NormPolicy, screen, update_norm


class CompressedStrategy(Strategy):
    """Compress the clients' train replies of any strategy with a fedquant codec.

    Use :func:`fedquant.flower.compression_mod` in the ClientApp.

    Parameters
    ----------
    strategy : Strategy
        The strategy whose train replies are compressed (it aggregates the decoded ones).
    codec : str | fq.Codec (default: "eden:bits=2")
        The codec, as a spec string ("name:key=value,...") or a codec instance.
    raw_patterns : Sequence[str] (default: fedquant.fl.arrays.DEFAULT_RAW_PATTERNS)
        Glob patterns of float arrays that travel uncompressed (default: BatchNorm's
        ``*running_mean``, ``*running_var``, ``*num_batches_tracked``); integer and bool
        arrays always do.
    seed_policy : str (default: "per-client")
        "per-client": each client's seed is derived from the round seed and its node id;
        "shared": every client uses the round seed (one shared rotation).
    error_feedback : bool (default: False)
        Ask clients to keep their compression residual and add it to the next update.
    run_seed : int (default: 0)
        Seed from which every round seed is derived.
    norm_policy : fedquant.robust.NormPolicy | None (default: None)
        Robust aggregation: reject (or clip) decoded updates whose L2 norm exceeds an
        absolute bound or a multiple of the round's median norm, e.g.
        ``NormPolicy(median_multiple=5.0)``. None accepts every finite update.

    Attributes
    ----------
    round_stats : dict[int, dict]
        Per round: replies, accepted, dropped (node id -> reason), payload_bytes (sum of
        ``len(payload)``), uplink_bytes (payloads plus raw arrays).

    Examples
    --------
    ::

        strategy = CompressedStrategy(FedAdam(...), codec="eden:bits=2")
        app = ClientApp(mods=[compression_mod])
    """

    def __init__(self, strategy: Strategy, codec: str | fq.Codec = "eden:bits=2", *,
                 raw_patterns: Sequence[str] = DEFAULT_RAW_PATTERNS,
                 seed_policy: str = "per-client", error_feedback: bool = False,
                 run_seed: int = 0, norm_policy: NormPolicy | None = None) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"CompressedStrategy wraps a flwr Strategy, got "
                            f"{type(strategy).__name__}")
        if _is_correlated(codec if isinstance(codec, fq.Codec) else fq.get_codec(codec)):
            seed_policy = "shared"  # the round's clients share the rotation and the strata
        if seed_policy not in SEED_POLICIES:
            raise ValueError(f"seed_policy must be one of {SEED_POLICIES}, got {seed_policy!r}")
        self.strategy = strategy
        self.codec = codec if isinstance(codec, fq.Codec) else fq.get_codec(codec)
        self.raw_patterns = tuple(raw_patterns)
        keys.raw_patterns_text(self.raw_patterns)  # ValueError now, not in round 1
        self.seed_policy, self.error_feedback = seed_policy, bool(error_feedback)
        self.run_seed = int(run_seed)
        if norm_policy is not None and not isinstance(norm_policy, NormPolicy):
            raise TypeError(f"norm_policy must be a fedquant.robust.NormPolicy, got "
                            f"{type(norm_policy).__name__}")
        self.norm_policy = norm_policy
        self.round_stats: dict[int, dict] = {}
        self._global: dict[str, np.ndarray] | None = None
        self._round: tuple[int, int, fq.Codec] | None = None
        self._strata: dict[int, int] = {}  # node id -> stratum (correlated codecs)

    def __repr__(self) -> str:
        return f"CompressedStrategy({self.strategy!r}, codec={fq.codec_spec(self.codec)!r})"

    def summary(self) -> None:
        log(INFO, "\t├──> fedquant compression: %s, seeds %s, raw %s, error feedback %s",
            fq.codec_spec(self.codec), self.seed_policy, self.raw_patterns or "none",
            self.error_feedback)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The inner strategy's train messages, with the fedquant settings in the config."""
        seed = round_seed(self.run_seed, server_round)
        codec = codec_for_round(self.codec, seed)
        self._round = (server_round, seed, codec)
        self._global = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))
        config[keys.CODEC_KEY] = fq.codec_spec(codec)
        config[keys.ROUND_SEED_KEY] = str(seed)
        config[keys.SEED_POLICY_KEY] = self.seed_policy
        config[keys.RAW_KEYS_KEY] = keys.raw_patterns_text(self.raw_patterns)
        config[keys.ERROR_FEEDBACK_KEY] = self.error_feedback
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if _is_correlated(codec) and messages:
            # correlated quantization (Suresh et al., ICML 2022): the n sampled clients of
            # the round take the strata 0..n-1 of one shared dither
            codec = type(codec)(**{**codec.params(), "clients": len(messages), "client": 0})
            self._round = (server_round, seed, codec)
            for index, msg in enumerate(messages):
                # strategies share one RecordDict between their messages: give each its own
                content = RecordDict(dict(msg.content.items()))
                key = next(k for k, c in content.config_records.items() if keys.CODEC_KEY in c)
                content[key] = ConfigRecord({**content[key], keys.CODEC_KEY: fq.codec_spec(codec),
                                             keys.CLIENT_INDEX_KEY: index})
                msg.content = content
            self._strata = {msg.metadata.dst_node_id: i for i, msg in enumerate(messages)}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the replies, drop the bad ones, let the inner strategy aggregate."""
        if self._global is None or self._round is None or self._round[0] != server_round:
            raise RuntimeError("CompressedStrategy has no global model for this round. Ensure "
                               "that `configure_train` has been called before aggregation.")
        _, seed, codec = self._round
        compressed, raw = split_keys(self._global, self.raw_patterns)
        numel = sum(self._global[k].size for k in compressed)
        stats = {"replies": 0, "accepted": 0, "dropped": {}, "payload_bytes": 0,
                 "uplink_bytes": 0}
        kept, decoded = [], {}
        for msg in replies:
            stats["replies"] += 1
            if msg.has_error():  # the inner strategy logs and counts errors its own way
                kept.append(msg)
                continue
            node = msg.metadata.src_node_id
            try:
                record_key, record = _single_record(msg)
                blob = _payload(record)
                stats["payload_bytes"] += len(blob)
                stats["uplink_bytes"] += len(blob) + sum(len(record[k].data) for k in raw
                                                         if k in record)
                expected = client_seed(seed, node, self.seed_policy)
                enc = check_payload(Payload(node, blob, 1.0, expected), numel, codec)
                if _is_correlated(codec) and codec.client_of(enc) != self._strata.get(node):
                    raise fq.WireError(f"stratum: expected client index "
                                       f"{self._strata.get(node)}, got {codec.client_of(enc)}")
                update = fq.decode(enc)  # fq.WireError if it decodes to non-finite values
                _check_raw(record, raw, self._global)
            except ValueError as err:  # fq.WireError is a ValueError
                self._drop(stats, node, str(err))
                continue
            decoded[node] = (msg, record_key, record, update)
        factors = {node: 1.0 for node in decoded}
        if self.norm_policy is not None and decoded:
            screening = screen({n: update_norm(d[3]) for n, d in decoded.items()},
                               self.norm_policy)
            factors = screening.accepted
            for node, reason in screening.rejected.items():
                self._drop(stats, node, reason)
        for node, factor in factors.items():
            msg, record_key, record, update = decoded[node]
            msg.content.array_records[record_key] = self._restore(update * factor, record,
                                                                  compressed)
            stats["accepted"] += 1
            kept.append(msg)
        self.round_stats[server_round] = stats
        arrays, metrics = self.strategy.aggregate_train(server_round, kept)
        if arrays is None:
            return None, metrics
        metrics = metrics if metrics is not None else MetricRecord()
        metrics["fedquant-payload-bytes"] = stats["payload_bytes"]
        metrics["fedquant-uplink-bytes"] = stats["uplink_bytes"]
        metrics["fedquant-dropped"] = len(stats["dropped"])
        return arrays, metrics

    def _drop(self, stats: dict, node: int, reason: str) -> None:
        stats["dropped"][node] = reason
        log(WARNING, "CompressedStrategy: dropped the reply of node %d: %s", node, reason)

    def _restore(self, update: torch.Tensor, record: ArrayRecord,
                 compressed: list[str]) -> ArrayRecord:
        """global + update for the compressed keys, the raw arrays as sent, in model order."""
        deltas = unflatten_arrays(update, self._global, compressed)
        arrays = {}
        for key, ref in self._global.items():
            if key in deltas:
                value = np.asarray(ref, np.float32) + np.asarray(deltas[key], np.float32)
                arrays[key] = Array(np.asarray(value, dtype=ref.dtype))
            else:
                arrays[key] = record[key]
        return ArrayRecord(arrays)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def _single_record(msg: Message) -> tuple[str, ArrayRecord]:
    if len(msg.content.array_records) != 1:
        raise ValueError(f"expected one ArrayRecord in the reply, found "
                         f"{len(msg.content.array_records)} (is compression_mod in the "
                         "ClientApp's mods?)")
    return next(iter(msg.content.array_records.items()))


def _is_correlated(codec: fq.Codec) -> bool:
    """Whether the codec's clients take strata of one shared dither (``clients``/``client``)."""
    return {"clients", "client"} <= set(codec.params())


def _check_raw(record: ArrayRecord, raw: list[str], global_: dict[str, np.ndarray]) -> None:
    """ValueError unless every raw array is present with the global model's shape."""
    for key in raw:
        if key not in record:
            raise ValueError(f"the reply lacks the raw array {key!r}")
        if tuple(record[key].shape) != global_[key].shape:
            raise ValueError(f"raw array {key!r} has shape {list(record[key].shape)}, "
                             f"expected {list(global_[key].shape)}")
        value = record[key].numpy()
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise ValueError(f"raw array {key!r} holds NaN or Inf")


def _payload(record: ArrayRecord) -> bytes:
    if keys.PAYLOAD_KEY not in record:
        raise ValueError(f"the reply has no '{keys.PAYLOAD_KEY}' array: add "
                         "fedquant.flower.compression_mod to the ClientApp's mods")
    array = record[keys.PAYLOAD_KEY]
    if array.stype != keys.PAYLOAD_STYPE:
        raise ValueError(f"'{keys.PAYLOAD_KEY}' has stype {array.stype!r}, expected "
                         f"{keys.PAYLOAD_STYPE!r}")
    return bytes(array.data)
