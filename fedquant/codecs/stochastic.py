"""Stochastic rounding onto 2^b uniform levels (non-subtractive), optionally after RHTs.

Seed 004 section 2, the stochastic scalar quantizer Q_StocQ (QSGD-like): a value between
two neighbouring levels q_k <= v < q_k + step is rounded up with probability
(v - q_k) / step and down otherwise, so E[Q(v)] = v (seed 001 section 2.1, eq. 2 and
Lemma C.1). Its error variance is f (1 - f) step^2 with f = (v - q_k) / step: it depends on
the input, and is at most step^2 / 4, about twice the subtractive dither's step^2 / 12 at
the same grid (REFERENCE.md: about 22 vs 7.9 at b = 1).

The grid of each slice of the (rotated) vector is lo + j * step, j = 0..2^b - 1, over its
min-max range (default) or over a user-given dynamic range [-R, R], in which case values
outside are clipped to the nearest end level first (seed 004's finite alphabet
A_K^delta: "assigned -K delta and K delta"), which biases the saturated coordinates only.

The rounding coins are the sender's private randomness (Purpose.PRIVATE, derived from the
seed): the receiver never needs them, it only rebuilds lo + step * j and undoes the
rotations. Wire: section "q" and float64 (lo, step) scales per slice, as the dither codec.

Example::

    enc = fq.get_codec("stochastic", bits=4, rotations=0).encode(grad, seed=7)
"""

from __future__ import annotations

import torch

from fedquant import random as fqr
from fedquant.codecs.base import Codec, register_codec
from fedquant.codecs.dither import (
    check_bits,
    grid,
    grid_positions,
    parse_range,
    rebuild,
    rotated_input,
    validate_uniform,
    value_blocks,
)
from fedquant.rotation import resolve_rotations
from fedquant.wire import Encoded, Section


@register_codec
class Stochastic(Codec):
    """Unbiased stochastic rounding onto 2^bits uniform levels (seed 004's StocQ).

    Args:
        bits (int, default 2): bits per coordinate, 1..8 (2^bits levels).
        rotations (int | str, default "auto"): composed RHTs, 0..3 or "auto" (0 = none).
        range (str | float, default "minmax"): "minmax" (per-slice min-max grid) or a
            dynamic range R > 0 (grid [-R, R], values outside clipped: biased there).
    """

    name = "stochastic"
    unbiased = True

    def __init__(self, bits: int = 2, rotations: str = "auto", range: str = "minmax"):  # noqa: A002
        self.bits = check_bits(bits)
        resolve_rotations(rotations, torch.ones(1))  # validate early
        self.rotations = str(rotations)
        self.dynamic_range = parse_range(range)
        self.range = "minmax" if self.dynamic_range is None else repr(self.dynamic_range)

    def encode(self, x: torch.Tensor, seed: int = 0) -> Encoded:
        v, k = rotated_input(self, x, seed)
        levels = 1 << self.bits
        coins = fqr.uniforms(seed, fqr.Purpose.PRIVATE, v.numel(), device=v.device)
        indices = torch.empty(v.numel(), dtype=torch.int64, device=v.device)
        scales: list[float] = []
        for lo_i, hi_i in value_blocks(x.numel(), k):
            lo, step = grid(v[lo_i:hi_i], levels, self.dynamic_range)
            t = grid_positions(v[lo_i:hi_i], lo, step, levels)
            down = t.to(torch.int64)  # t >= 0: truncation is the floor
            up = coins[lo_i:hi_i] < t - down  # P(up) = the fractional part of t
            indices[lo_i:hi_i] = (down + up).clamp_(0, levels - 1)
            scales += [lo, step]
        return self._new_encoded(x, seed, rotations=k, scales=tuple(scales),
                                 sections={"q": Section.from_ints("q", indices, self.bits)})

    def validate(self, enc: Encoded) -> None:
        validate_uniform(self, enc)

    def decode(self, enc: Encoded, device=None) -> torch.Tensor:
        q = enc.section("q").ints(device).to(torch.float64)
        values = torch.empty(q.numel(), dtype=torch.float32, device=q.device)
        blocks = value_blocks(enc.numel, enc.rotations)
        for (lo_i, hi_i), lo, step in zip(blocks, enc.scales[0::2], enc.scales[1::2],
                                          strict=True):
            values[lo_i:hi_i] = (lo + step * q[lo_i:hi_i]).to(torch.float32)
        return rebuild(enc, values)


__all__ = ["Stochastic"]
