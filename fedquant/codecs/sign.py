"""Scaled sign: one bit per coordinate and one l1 scale (signSGD with the l1 scale).

Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems" (ICML 2018),
and the scaled sign compressor of Karimireddy et al., "Error Feedback Fixes SignSGD"
(ICML 2019, Algorithm 1): x_hat = (||x||_1 / d) * sign(x). The l1 scale is the
least-squares scale of the sign vector, so the estimate is biased (no rotation, no
randomness). Zeros are sent as +1.

Example::

    enc = fq.get_codec("sign").encode(grad)
"""

from __future__ import annotations

import torch

from fedquant.codecs.base import (
    Codec,
    check_input,
    check_seed,
    expect_scales,
    expect_section,
    register_codec,
)
from fedquant.wire import Encoded, Section


@register_codec
class ScaledSign(Codec):
    """signSGD's scaled sign: bit 1 for a negative coordinate, scale ||x||_1 / d (float64).

    Takes no parameters.
    """

    name = "sign"
    unbiased = False

    def __init__(self):
        pass

    def encode(self, x: torch.Tensor, seed: int = 0) -> Encoded:
        flat = check_input(x)
        scale = float(flat.to(torch.float64).abs().sum()) / max(flat.numel(), 1)
        negative = (flat < 0).to(torch.int64)
        return self._new_encoded(x, check_seed(seed), scales=(scale,),
                                 sections={"signs": Section.from_ints("signs", negative, 1)})

    def validate(self, enc: Encoded) -> None:
        expect_section(enc, "signs", enc.numel, 1)
        expect_scales(enc, 1)

    def decode(self, enc: Encoded, device=None) -> torch.Tensor:
        negative = enc.section("signs").ints(device)
        return ((1 - 2 * negative).to(torch.float64) * enc.scales[0]).to(torch.float32)
