"""A user-defined codec, registered through fedquant's public registry.

`fedquant compare --config simulations/examples/my_compare.toml` imports this module (the
config's `plugins` list) and the codec shows up in every section of the comparison without
any change to fedquant itself.

`absmax8` is the per-tensor int8 quantizer that many frameworks use: scale by the largest
magnitude, round to the nearest of 255 levels. It is deterministic and so biased, unlike
fedquant's rotated quantizers.
"""

from __future__ import annotations

import torch

import fedquant as fq
from fedquant.codecs.base import check_input, check_seed, expect_scales, expect_section


@fq.register_codec
class AbsMax8(fq.Codec):
    """Round x / max|x| * 127 to int8 and send it with the float64 max|x|."""

    name = "absmax8"

    def __init__(self):
        pass

    def encode(self, x: torch.Tensor, seed: int = 0) -> fq.Encoded:
        flat = check_input(x)
        absmax = float(flat.abs().max()) if flat.numel() else 0.0
        scale = absmax / 127 if absmax > 0 else 1.0
        q = torch.round(flat / scale).clamp(-127, 127).to(torch.int64) + 127
        return self._new_encoded(x, check_seed(seed), scales=(scale,),
                                 sections={"q": fq.Section.from_ints("q", q, 8)})

    def validate(self, enc: fq.Encoded) -> None:
        expect_section(enc, "q", enc.numel, 8)
        expect_scales(enc, 1)

    def decode(self, enc: fq.Encoded, device=None) -> torch.Tensor:
        q = enc.section("q").ints(device).to(torch.float32) - 127
        return q * enc.scales[0]
