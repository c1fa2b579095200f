"""Stochastic rounding onto 2^b uniform levels (non-subtractive), optionally after RHTs.

SPFQ (Zhang and Saab, https://arxiv.org/abs/2309.10975) section 2, the stochastic scalar
quantizer Q_StocQ (QSGD-like): a value between
two neighbouring levels q_k <= v < q_k + step is rounded up with probability
(v - q_k) / step and down otherwise, so E[Q(v)] = v (LPLR (Saha et al.) section 2.1, eq. 2 and
Lemma C.1). Its error variance is f (1 - f) step^2 with f = (v - q_k) / step: it depends on
the input, and is at most step^2 / 4, about twice the subtractive dither's step^2 / 12 at
the same grid (REFERENCE.md: about 22 vs 7.9 at b = 1).

The grid of each slice of the (rotated) vector is lo + j * step, j = 0..2^b - 1, over its
min-max range (default) or over a user-given dynamic range [-R, R], in which case values
outside are clipped to the nearest end level first (SPFQ's finite alphabet
A_K^delta: "assigned -K delta and K delta"), which biases the saturated coordinates only.

The rounding coins are the sender's private randomness (Purpose.PRIVATE, derived from the
seed): the receiver never needs them, it only rebuilds lo + step * j and undoes the
rotations. Wire: section "q" and float64 (lo, step) scales per slice, as the dither codec.

Example::

    enc = fq.get_codec("stochastic", bits=4, rotations=0).encode(grad, seed=7)
"""

from __future__ import annotations

import torch

from fedquant import grid_kernels
from fedquant import random as fqr
from fedquant.codecs.base import register_codec
from fedquant.codecs.dither import UniformGridCodec


@register_codec
class Stochastic(UniformGridCodec):
    """Unbiased stochastic rounding onto 2^bits uniform levels (SPFQ's StocQ).

    Rounds up with probability equal to the fractional grid position, using the sender's
    private coins. Parameters as in :class:`fedquant.codecs.dither.UniformGridCodec`.
    """

    name = "stochastic"
    purpose = fqr.Purpose.PRIVATE
    rule = grid_kernels.STOCHASTIC

    def round_to_levels(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        down = t.to(torch.int64)  # t >= 0: truncation is the floor
        return down + (u < t - down)  # P(up) = the fractional part of t

    def levels_to_positions(self, q: torch.Tensor, seed: int) -> torch.Tensor:
        return q.to(torch.float64)


__all__ = ["Stochastic"]
