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
from fedquant.packing import unpack
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
        # the float64 l1 norm without a float64 copy; one byte per sign before packing
        scale = float(torch.linalg.vector_norm(flat, 1, dtype=torch.float64)) / max(
            flat.numel(), 1)
        negative = (flat < 0).to(torch.uint8)
        return self._new_encoded(x, check_seed(seed), scales=(scale,),
                                 sections={"signs": Section.from_ints("signs", negative, 1)})

    def validate(self, enc: Encoded) -> None:
        expect_section(enc, "signs", enc.numel, 1)
        expect_scales(enc, 1)

    def decode(self, enc: Encoded, device=None) -> torch.Tensor:
        section = enc.section("signs")
        negative = unpack(section.data, 1, section.count, device, dtype=torch.uint8)
        # float32(+-scale) = +-float32(scale): each value is one float32 times +-1, exactly
        scale = torch.tensor(enc.scales[0], dtype=torch.float32).item()
        return negative.to(torch.float32).mul_(-2.0).add_(1.0).mul_(scale)
