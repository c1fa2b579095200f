"""Decoding and distributed mean estimation.

``decode_mean`` returns the weighted mean of the clients' reconstructions, computed by the
codec's ``decode_sum`` (a rotated-domain sum where the scheme allows, as QUIC-FL with a
shared rotation does), with O(d) extra memory whatever the number of clients. It is
unbiased whenever the codec is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedquant.codecs.base import codec_for, restore
from fedquant.wire import Encoded


def decode(enc: Encoded, device: torch.device | str | None = None) -> torch.Tensor:
    """The reconstruction of one encoded tensor, with its original shape and dtype."""
    return restore(codec_for(enc).decode(enc, device), enc)


def decode_mean(encs: Sequence[Encoded], weights: Sequence[float] | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Weighted mean sum_i w_i x_hat_i / sum_i w_i of encodings of one codec and shape."""
    encs = list(encs)
    if not encs:
        raise ValueError("decode_mean needs at least one encoded update")
    first = encs[0]
    for i, enc in enumerate(encs[1:], start=1):
        if (enc.codec, enc.params, enc.shape) != (first.codec, first.params, first.shape):
            raise ValueError(
                f"encs[{i}] is {enc.codec}{enc.params} of shape {list(enc.shape)}, but encs[0] "
                f"is {first.codec}{first.params} of shape {list(first.shape)}: all must match")
    if weights is None:
        weights = [1.0] * len(encs)
    weights = [float(w) for w in weights]
    if len(weights) != len(encs):
        raise ValueError(f"got {len(weights)} weights for {len(encs)} updates")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    total = codec_for(first).decode_sum(encs, weights, device)
    return restore(total / sum(weights), first)
