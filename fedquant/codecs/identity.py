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

from fedquant import buffers, cpu_kernels
from fedquant.codecs.base import Codec, check_input, check_seed, expect_section, register_codec
from fedquant.wire import Encoded, Section

# float64 sum block: 8 MiB, stays in L3 while every client adds to it. Smaller blocks
# (64 Ki..256 Ki coordinates) were 1.5-2.5x slower at d = 2^20, n = 10: the jumps between
# the clients' buffers break the hardware prefetcher's streams.
SUM_BLOCK = 1 << 20
MIN_BLOCK = 1 << 16  # below this a block is not worth a thread
# words to add in all before a second thread pays for its start (d = 2^20: n = 10 was
# 1.9-2.1x n plain adds with two threads, 1.7x with one; n = 100 1.05-1.15x with two)
PARALLEL_MIN = 1 << 25


def _little_endian_cpu(device: torch.device | str | None) -> bool:
    """Whether payload words can be read in place as tensors for `device`."""
    return sys.byteorder == "little" and buffers.on_cpu(device)


class _Identity(Codec):
    """Send every coordinate in `wire_dtype`."""

    wire_dtype: torch.dtype = torch.float32
    unbiased = True

    def __init__(self):
        pass

    def encode(self, x: torch.Tensor, seed: int = 0) -> Encoded:
        flat = check_input(x)
        if self.wire_dtype != torch.float32 and flat.numel():
            # beyond the format's range a value would travel as Inf. One float32 pass
            # (torch's float16 reductions are 10x slower on the CPU)
            low, high = torch.aminmax(flat)
            largest = max(-float(low), float(high))
            info = torch.finfo(self.wire_dtype)
            # from max + half an ulp of max on, rounding gives Inf
            if largest >= info.max + info.max * info.eps / (2 - info.eps) / 2:
                raise ValueError(f"{self.name}: the input is too large to encode: max |x| = "
                                 f"{largest:.3g} exceeds {self.name}'s range "
                                 f"({info.max:.6g}); use "
                                 f"{'bf16 or fp32' if self.name == 'fp16' else 'fp32'}")
        values = flat
        if self.wire_dtype != torch.float32:  # one converting pass into huge pages
            values = buffers.empty(flat.numel(), self.wire_dtype, flat.device).copy_(flat)
        if self.wire_dtype == torch.bfloat16:
            values = values.view(torch.int16)
        return self._new_encoded(x, check_seed(seed),
                                 sections={"values": Section.from_raw("values", values)})

    def validate(self, enc: Encoded) -> None:
        expect_section(enc, "values", enc.numel, torch.finfo(self.wire_dtype).bits)

    def decode(self, enc: Encoded, device=None) -> torch.Tensor:
        if _little_endian_cpu(device):  # one pass from the payload into huge pages
            out = buffers.empty(enc.numel)
            if self.wire_dtype == torch.float32:  # a copy: no tensor over read-only bytes
                out.numpy()[:] = np.frombuffer(enc.section("values").data, dtype=np.float32)
                return out
            return out.copy_(self._views([enc])[0])  # converting fp16 / bf16
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
        """sum_i w_i x_i in float64 (see :meth:`_blocked_sum`)."""
        return self._blocked_sum(encs, weights, device, divisor=None)

    def decode_mean(self, encs: Sequence[Encoded], weights: Sequence[float],
                    device=None) -> torch.Tensor:
        """sum_i w_i x_i / sum_i w_i in float32: each block's float64 sum is divided and
        written out as float32 while it is in cache, so no d-long float64 array exists."""
        return self._blocked_sum(encs, weights, device, divisor=sum(weights))

    def _blocked_sum(self, encs: Sequence[Encoded], weights: Sequence[float], device,
                     divisor: float | None) -> torch.Tensor:
        """sum_i w_i x_i block by block: each client's words (read in place from the
        payload, no copy) are added in one streaming pass into a float64 block that stays
        in cache; with PARALLEL_MIN words in all, blocks are split between threads (one per
        core). With a `divisor`, each block is divided by it and stored as float32."""
        if not _little_endian_cpu(device) or not encs or not cpu_kernels.AVAILABLE:
            total = super().decode_sum(encs, weights, device).to(torch.float64)
            return total if divisor is None else (total / divisor).to(torch.float32)
        views = self._views(encs)
        pairs = [(v, float(w)) for v, w in zip(views, weights, strict=True) if w != 0]
        n = encs[0].numel
        out = buffers.empty(n, torch.float64 if divisor is None else torch.float32)
        workers = 1
        if len(pairs) * n >= PARALLEL_MIN:
            workers = max(1, min(os.cpu_count() or 1, -(-n // MIN_BLOCK)))
        size = min(SUM_BLOCK, -(-n // workers))  # at least one block per worker
        blocks = list(range(0, n, size))

        def add_blocks(starts: list[int]) -> None:
            scratch = None if divisor is None else torch.empty(size, dtype=torch.float64)
            for lo in starts:
                hi = min(n, lo + size)
                part = out[lo:hi] if scratch is None else scratch[: hi - lo]
                part.zero_()
                for v, w in pairs:
                    block = v[lo:hi]
                    if block.dtype == torch.float32:
                        cpu_kernels.axpy(part, block, w)  # one fused pass, no temporary
                    else:
                        part.add_(block, alpha=w)  # float16 / bfloat16: torch converts
                if scratch is not None:
                    cpu_kernels.divide_to_float32(part, divisor, out[lo:hi])
        if workers == 1:
            add_blocks(blocks)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(add_blocks, [blocks[k::workers] for k in range(workers)]))
        return out


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
