"""Uncompressed baselines: fp32, fp16 and bf16, so every comparison has its reference row.

The tensor is cast to the format and sent as raw little-endian words; bf16 travels as the
16-bit patterns of its values.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fedquant import cpu_kernels
from fedquant.codecs.base import Codec, check_input, check_seed, expect_section, register_codec
from fedquant.wire import Encoded, Section

SUM_BLOCK = 1 << 16  # float64 sum block: 512 KiB, stays in L2 while every client adds to it


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

    def _views(self, encs: Sequence[Encoded]) -> list[torch.Tensor]:
        """Zero-copy tensors over the payload bytes (little-endian hosts; read-only)."""
        dtype = torch.int16 if self.wire_dtype == torch.bfloat16 else self.wire_dtype
        views = []
        with warnings.catch_warnings():  # bytes are read-only; these views are only read
            warnings.simplefilter("ignore", UserWarning)
            for enc in encs:
                data = np.frombuffer(enc.section("values").data, dtype=np.uint8)
                view = torch.from_numpy(data).view(dtype)
                views.append(view.view(torch.bfloat16) if dtype == torch.int16 else view)
        return views

    def decode_sum(self, encs: Sequence[Encoded], weights: Sequence[float],
                   device=None) -> torch.Tensor:
        """sum_i w_i x_i in float64, block by block: each float64 block of the sum stays
        in cache while every client's words (read in place from the payload, no copy) are
        added to it; blocks are split between threads (one per core)."""
        on_cpu = device is None or torch.device(device).type == "cpu"
        if not on_cpu or sys.byteorder != "little" or not encs:
            return super().decode_sum(encs, weights, device).to(torch.float64)
        views = self._views(encs)
        pairs = [(v, float(w)) for v, w in zip(views, weights, strict=True) if w != 0]
        n = encs[0].numel
        total = torch.zeros(n, dtype=torch.float64)
        blocks = list(range(0, n, SUM_BLOCK))

        def add_blocks(starts: list[int]) -> None:
            for lo in starts:
                part = total[lo: lo + SUM_BLOCK]
                for v, w in pairs:
                    block = v[lo: lo + SUM_BLOCK]
                    if block.dtype == torch.float32:
                        cpu_kernels.axpy(part, block, w)  # one fused pass, no temporary
                    else:
                        part.add_(block, alpha=w)  # float16 / bfloat16: torch converts
        workers = max(1, min(os.cpu_count() or 1, len(blocks)))
        if workers == 1:
            add_blocks(blocks)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(add_blocks, [blocks[k::workers] for k in range(workers)]))
        return total


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
