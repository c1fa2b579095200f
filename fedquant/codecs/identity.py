"""Uncompressed baselines: fp32, fp16 and bf16, so every comparison has its reference row.

The tensor is cast to the format and sent as raw little-endian words; bf16 travels as the
16-bit patterns of its values.
"""

from __future__ import annotations

import torch

from fedquant.codecs.base import Codec, check_input, check_seed, expect_section, register_codec
from fedquant.wire import Encoded, Section


class _Identity(Codec):
    """Send every coordinate in `wire_dtype`."""

    wire_dtype: torch.dtype = torch.float32
    unbiased = True

    def __init__(self):
        pass

    def encode(self, x: torch.Tensor, seed: int = 0) -> Encoded:
        values = check_input(x).to(self.wire_dtype)
        if self.wire_dtype == torch.bfloat16:
            values = values.view(torch.int16)
        return self._new_encoded(x, check_seed(seed),
                                 sections={"values": Section.from_raw("values", values)})

    def validate(self, enc: Encoded) -> None:
        expect_section(enc, "values", enc.numel, torch.finfo(self.wire_dtype).bits)

    def decode(self, enc: Encoded, device=None) -> torch.Tensor:
        section = enc.section("values")
        if self.wire_dtype == torch.bfloat16:
            return section.raw("int", device).view(torch.bfloat16).to(torch.float32)
        return section.raw("float", device).to(torch.float32)


@register_codec
class Fp32(_Identity):
    """Uncompressed float32 (32 bits per coordinate)."""

    name = "fp32"
    wire_dtype = torch.float32


@register_codec
class Fp16(_Identity):
    """IEEE half precision (16 bits per coordinate; biased only by rounding)."""

    name = "fp16"
    wire_dtype = torch.float16


@register_codec
class Bf16(_Identity):
    """bfloat16 (16 bits per coordinate; biased only by rounding)."""

    name = "bf16"
    wire_dtype = torch.bfloat16
