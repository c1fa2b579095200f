"""``compression_mod``: the client half of fedquant's Flower integration.

On a train message configured by :class:`fedquant.flower.CompressedStrategy`, the mod lets
the ClientApp train as usual, then replaces the floating-point arrays of its reply by ONE
``fq.Encoded`` of the update (reply - received, all float arrays concatenated), encoded
with the codec and the seed the server named (``client_seed(round_seed, node_id)``).
Integer and bool arrays and the keys that match the server's raw patterns (BatchNorm's
running statistics by default) travel uncompressed. Other messages and error replies pass
through untouched.
"""

from __future__ import annotations

from logging import ERROR

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore import log

import fedquant as fq
from fedquant.fl import (
    client_seed,
    codec_for_round,
    encode_update,
    flatten_arrays,
    split_keys,
)
from fedquant.flower import keys


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Compress the ClientApp's train reply with the codec the server configured.

    Needs :class:`fedquant.flower.CompressedStrategy` on the server; without it, the reply
    is an error that names the missing wrapper. Put it last among mods that change arrays
    (like Flower's ``fixedclipping_mod``)::

        app = ClientApp(mods=[compression_mod])
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    config = next((c for c in msg.content.config_records.values() if keys.CODEC_KEY in c),
                  None)
    if config is None:
        return _error(msg, f"compression_mod found no '{keys.CODEC_KEY}' in the train "
                      "message config: wrap the ServerApp's strategy in "
                      "fedquant.flower.CompressedStrategy(strategy, codec=...)")
    if len(msg.content.array_records) != 1:
        return _error(msg, "compression_mod expects exactly one ArrayRecord (the global "
                      f"model) in the train message, found {len(msg.content.array_records)}")
    try:
        settings = _Settings.from_config(config)
    except ValueError as err:
        return _error(msg, f"compression_mod: bad fedquant config from the server: {err}")
    received = next(iter(msg.content.array_records.values())).to_numpy_ndarrays()
    received_keys = list(next(iter(msg.content.array_records.values())).keys())

    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if len(reply.content.array_records) != 1:
        return _error(msg, "compression_mod expects the ClientApp's train reply to hold "
                      f"exactly one ArrayRecord, found {len(reply.content.array_records)}")
    record_key, record = next(iter(reply.content.array_records.items()))
    if list(record.keys()) != received_keys:
        return _error(msg, "compression_mod expects the reply's ArrayRecord to have the "
                      f"keys of the received model {received_keys}, got {list(record.keys())}")
    local = dict(zip(received_keys, record.to_numpy_ndarrays(), strict=True))
    received = dict(zip(received_keys, received, strict=True))
    # classify by the RECEIVED arrays, as the server does: an aggregated int array (e.g.
    # num_batches_tracked averaged by FedAvg) arrives as float and is compressed
    compressed, raw = split_keys(received, settings.raw_patterns)
    update = flatten_arrays(local, compressed) - flatten_arrays(received, compressed)
    residual = _residual(context, update) if settings.error_feedback else None
    seed = client_seed(settings.round_seed, context.node_id, settings.seed_policy)
    enc, residual = encode_update(update, settings.codec, seed, residual)
    if residual is not None:
        context.state[keys.RESIDUAL_KEY] = ArrayRecord({"residual": Array(residual.numpy())})
    blob = enc.to_bytes()
    arrays = {keys.PAYLOAD_KEY: Array(dtype="uint8", shape=(len(blob),),
                                      stype=keys.PAYLOAD_STYPE, data=blob)}
    arrays.update({k: record[k] for k in raw})
    reply.content.array_records[record_key] = ArrayRecord(arrays)
    return reply


class _Settings:
    """The fedquant settings of one train message."""

    __slots__ = ("codec", "error_feedback", "raw_patterns", "round_seed", "seed_policy")

    @classmethod
    def from_config(cls, config: ConfigRecord) -> _Settings:
        s = cls()
        try:
            s.round_seed = int(str(config[keys.ROUND_SEED_KEY]))
        except (KeyError, ValueError):
            raise ValueError(f"'{keys.ROUND_SEED_KEY}' must be an integer as text") from None
        index = ({"client": int(config[keys.CLIENT_INDEX_KEY])}
                 if keys.CLIENT_INDEX_KEY in config else {})  # correlated quantization
        s.codec = codec_for_round(fq.get_codec(str(config[keys.CODEC_KEY]), **index),
                                  s.round_seed)
        s.seed_policy = str(config.get(keys.SEED_POLICY_KEY, "per-client"))
        s.raw_patterns = keys.raw_patterns_from_text(str(config.get(keys.RAW_KEYS_KEY,
                                                                    "none")))
        s.error_feedback = bool(config.get(keys.ERROR_FEEDBACK_KEY, False))
        return s


def _residual(context: Context, update: torch.Tensor) -> torch.Tensor:
    """The node's error-feedback residual (zeros at first, or after the model changed size)."""
    kept = context.state.array_records.get(keys.RESIDUAL_KEY)
    if kept is not None:
        residual = torch.from_numpy(np.array(kept["residual"].numpy(), dtype=np.float32))
        if residual.shape == update.shape:
            return residual
    return torch.zeros_like(update)


def _error(msg: Message, reason: str) -> Message:
    log(ERROR, reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
