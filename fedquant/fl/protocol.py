"""Seeds, compression and aggregation of one federated round.

The round's server picks ``round_seed(run_seed, round)``; each client derives its own seed
``client_seed(round_seed, node_id)`` so that the server can check and regenerate it (the
shared-randomness contract of DRIVE and EDEN: Vargaftik et al., NeurIPS 2021,
https://arxiv.org/abs/2105.08339 and ICML 2022, https://arxiv.org/abs/2108.08842). Codecs
that share one rotation per round (QUIC-FL, Ben Basat et al., https://arxiv.org/abs/2205.13341)
take the round seed as their ``round_seed`` parameter, so the server can sum the clients in
the rotated domain.

Example::

    codec = codec_for_round(fq.get_codec("eden:bits=2"), rs := round_seed(0, 1))
    enc, residual = encode_update(delta, codec, client_seed(rs, node_id=7))
    result = aggregate_payloads(global_flat, [Payload(7, enc.to_bytes(), 32)], codec)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import fedquant as fq

SEED_POLICIES = ("per-client", "shared")


def round_seed(run_seed: int, server_round: int) -> int:
    """The server's seed for one round (clients derive theirs from it and their node id)."""
    return fq.random.derive_seed(fq.random.hash64(run_seed, fq.random.Purpose.CLIENT, 0),
                                 server_round)


def client_seed(round_seed_: int, node_id: int, policy: str = "per-client") -> int:
    """Seed policy: each client its own seed, or the round seed shared by all clients."""
    if policy not in SEED_POLICIES:
        raise ValueError(f"seed policy must be one of {SEED_POLICIES}, got {policy!r}")
    return fq.random.derive_seed(round_seed_, node_id) if policy == "per-client" else round_seed_


def codec_for_round(codec: fq.Codec, round_seed_: int) -> fq.Codec:
    """The codec for one round: a codec with a ``round_seed`` parameter (QUIC-FL) gets the
    round's seed, so all clients share one rotation and the server sums in rotated space."""
    params = codec.params()
    if "round_seed" not in params or params["round_seed"] == round_seed_:
        return codec
    return type(codec)(**{**params, "round_seed": round_seed_})


def encode_update(update: torch.Tensor, codec: fq.Codec, seed: int,
                  residual: torch.Tensor | None = None,
                  ) -> tuple[fq.Encoded, torch.Tensor | None]:
    """Compress one client's update; with error feedback, also the new residual.

    With a `residual` (possibly zeros) the client sends encode(update + residual) and keeps
    residual' = update + residual - decode(sent) (error feedback, Seide et al., 2014; Karimireddy
    et al., ICML 2019, https://arxiv.org/abs/1901.09847).
    """
    if residual is not None:
        update = update + residual.to(update.device, update.dtype)
    enc = codec.encode(update, seed=seed)
    if residual is not None:
        residual = update - fq.decode(enc).to(update.device, update.dtype)
    return enc, residual


@dataclass(frozen=True)
class Payload:
    """One client's reply as the server received it."""

    node_id: int
    data: bytes
    num_examples: float
    expected_seed: int | None = None  # the seed the seed policy says it must carry


@dataclass
class Aggregate:
    """The new global model and what happened to each payload."""

    global_flat: torch.Tensor
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    uplink_bytes: int = 0  # sum of len(payload) over every reply received


def check_payload(p: Payload, numel: int, codec: fq.Codec) -> fq.Encoded:
    """Parse one payload and check it against the round: the same codec with the same
    parameters, `numel` elements, the expected seed and a positive weight.

    Raises fq.WireError (a ValueError) or ValueError naming what is wrong.
    """
    if not isinstance(p.data, bytes | bytearray):
        raise fq.WireError(f"payload must be bytes, got {type(p.data).__name__}")
    enc = fq.Encoded.from_bytes(bytes(p.data), max_elements=numel)
    if enc.codec != codec.name:
        raise fq.WireError(f"codec: expected {codec.name!r}, got {enc.codec!r}")
    expected = codec.wire_params()
    if dict(enc.params) != expected:
        raise fq.WireError(f"codec parameters: expected {fq.codec_spec(codec)!r}, got "
                           f"{enc.codec}:{','.join(f'{k}={v}' for k, v in enc.params.items())}")
    if enc.numel != numel:
        raise fq.WireError(f"shape: expected {numel} elements, got {list(enc.shape)}")
    if p.expected_seed is not None and enc.seed != p.expected_seed:
        raise fq.WireError(f"seed: expected {p.expected_seed} from the seed policy, "
                           f"got {enc.seed}")
    if not (isinstance(p.num_examples, int | float) and not isinstance(p.num_examples, bool)
            and math.isfinite(p.num_examples) and 0 < p.num_examples <= 2**53):
        raise ValueError(f"num-examples must be a positive number up to 2^53, "
                         f"got {p.num_examples!r}")
    return enc


def aggregate_payloads(global_flat: torch.Tensor, payloads: Sequence[Payload],
                       codec: fq.Codec, server_lr: float = 1.0) -> Aggregate:
    """global + server_lr * fq.decode_mean(valid payloads, weights = num_examples).

    A payload that does not parse, is of another codec, parameters or size, carries the
    wrong seed or decodes to non-finite values is dropped with its reason in ``rejected``;
    the others still make the round.
    """
    result = Aggregate(global_flat, uplink_bytes=sum(len(p.data) for p in payloads
                                                      if isinstance(p.data, bytes | bytearray)))
    encs, weights, nodes = [], [], []
    for p in payloads:
        try:
            enc = check_payload(p, global_flat.numel(), codec)
        except ValueError as err:  # fq.WireError is a ValueError
            result.rejected[p.node_id] = str(err)
            continue
        encs.append(enc)
        weights.append(float(p.num_examples))
        nodes.append(p.node_id)
    if not encs:
        return result
    try:
        mean_delta = fq.decode_mean(encs, weights).to(global_flat.device).reshape(-1)
        if not bool(torch.isfinite(mean_delta).all()):
            raise fq.WireError("decoded mean is not finite")
    except ValueError:
        # the mean failed as a whole: decode each payload alone to find the bad ones
        good = [i for i, enc in enumerate(encs) if _decodes_finite(enc, result, nodes[i])]
        if not good:
            return result
        encs, weights, nodes = ([seq[i] for i in good] for seq in (encs, weights, nodes))
        mean_delta = fq.decode_mean(encs, weights).to(global_flat.device).reshape(-1)
    result.accepted = nodes
    result.global_flat = global_flat + server_lr * mean_delta
    return result


def _decodes_finite(enc: fq.Encoded, result: Aggregate, node_id: int) -> bool:
    try:
        if bool(torch.isfinite(fq.decode(enc)).all()):
            return True
        result.rejected[node_id] = "decodes to non-finite values"
    except ValueError as err:
        result.rejected[node_id] = str(err)
    return False
