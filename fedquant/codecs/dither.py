"""Subtractive dithered uniform quantization, optionally after composed RHTs.

The inner-product quantization notes after Ordentlich and Polyanskiy ("Optimal Quantization
for Matrix Multiplication", 2024), section 4.1, and LPLR (Saha et al.) section 2.1 (eq. 1).
Each slice v of the (rotated)
vector gets a uniform grid of M = 2^b levels q_j = lo + j * step, j = 0..M-1, spanning its
min-max range (step = (max - min) / (M - 1), LPLR's Delta = 2R / (M - 1)) or a
dynamic range [-R, R] given by the user. With a shared dither u_i ~ U[0, 1) that the
receiver regenerates from (seed, Purpose.DITHER, i), the sender transmits

    j_i = floor((v_i - lo) / step + u_i)          (clamped to 0..M-1)

and the receiver subtracts the dither again:

    v_hat_i = lo + step * (j_i - u_i + 1/2).

The error v_hat_i - v_i = step * (floor(t + u) - (t + u) + 1/2) with t = (v_i - lo) / step is
uniform on [-step/2, step/2) for every input value, so the estimate is unbiased and its
error variance is step^2 / 12 whatever x is (the classical subtractive-dither property;
The notes' section 4.1 write the same quantizer as Delta * floor((A + Z) / Delta) without
the subtraction, whose formula was lost in conversion: rebuilt from that definition and
checked by tests/test_dither.py, which measures step^2 / 12 from the sent scales).

``range="minmax"`` (default) never saturates. A float ``range=R`` uses the fixed grid
[-R, R] on the values actually quantized (the rotated coordinates, which are about
N(0, ||x||^2 / d) after the RHTs; the raw coordinates with ``rotations=0``): values outside
are clipped to [-R, R] first, so saturated coordinates are biased (LPLR (Saha et al.) section 2.1,
"saturated"), everything inside stays unbiased.

Wire: section "q" (b-bit indices, one per quantized coordinate: the padded rotated length
with rotations, d without), and scales (lo, step) in float64 per slice of
``rotation.slice_layout(d)``.

Example::

    enc = fq.get_codec("dither", bits=2).encode(grad, seed=7)
"""

from __future__ import annotations

import math

import torch

from fedquant import buffers, cpu_kernels, grid_kernels
from fedquant import random as fqr
from fedquant.codecs.base import expect_section, register_codec
from fedquant.codecs.rotated import RotatedCodec
from fedquant.rotation import padded_size, slice_layout
from fedquant.wire import Encoded, Section, WireError


def parse_range(value: str | float) -> float | None:
    """The user's dynamic range R > 0 as a float, or None for "minmax"."""
    if value == "minmax":
        return None
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"range must be 'minmax' or a positive float, got {value!r}") from None
    if not (math.isfinite(r) and r > 0):
        raise ValueError(f"range must be 'minmax' or a positive float, got {value!r}")
    return r


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return bits


def value_blocks(d: int, rotations: int) -> list[tuple[int, int]]:
    """[lo, hi) of each slice in the quantized vector: padded slices after rotation,
    the raw coordinates of each slice without (no padding is sent then)."""
    if rotations > 0:
        return [(s.offset, s.offset + s.size) for s in slice_layout(d)]
    return [(s.start, s.start + s.length) for s in slice_layout(d)]


def quantized_length(d: int, rotations: int) -> int:
    """Number of quantized coordinates (the length of section "q")."""
    return padded_size(d) if rotations > 0 else d


def grid(v: torch.Tensor, levels: int, dynamic_range: float | None) -> tuple[float, float]:
    """(lo, step) in float64 of the uniform grid lo + j * step, j = 0..levels-1."""
    if dynamic_range is not None:
        return -dynamic_range, 2 * dynamic_range / (levels - 1)
    if v.numel() == 0:
        return 0.0, 0.0
    lo, hi = float(v.min()), float(v.max())
    return lo, (hi - lo) / (levels - 1)


def grid_positions(v: torch.Tensor, lo: float, step: float, levels: int) -> torch.Tensor:
    """t = (v - lo) / step clipped to [0, levels - 1] (0 where step is 0)."""
    if step == 0:
        return torch.zeros_like(v)
    return ((v - lo) * (1.0 / step)).clamp_(0, levels - 1)


class UniformGridCodec(RotatedCodec):
    """Shared mechanics of the uniform-grid quantizers (dither, stochastic): optional RHTs,
    a per-slice grid lo + j * step with 2^bits levels, one rounding rule per subclass.

    Subclasses set `name`, the randomness `purpose` of their rounding uniforms and the
    numba kernels' `rule`, and implement `round_to_levels` (sender) and
    `levels_to_positions` (receiver), the torch path the kernels match bit for bit.

    Args:
        bits (int, default 2): bits per coordinate, 1..8 (2^bits levels).
        rotations (int | str, default "auto"): composed RHTs, 0..3 or "auto" (0 = none).
        range (str | float, default "minmax"): "minmax" (per-slice min-max grid) or a
            dynamic range R > 0 (grid [-R, R], values outside clipped: biased there).
    """

    unbiased = True
    raw_without_rotation = True  # rotations = 0 quantizes x itself, unpadded
    purpose: fqr.Purpose
    rule: int  # the numba kernels' rounding rule (fedquant.grid_kernels)

    def __init__(self, bits: int = 2, rotations: str = "auto", range: str = "minmax"):  # noqa: A002
        self.bits = check_bits(bits)
        self.set_rotations(rotations)
        self.dynamic_range = parse_range(range)
        self.range = "minmax" if self.dynamic_range is None else repr(self.dynamic_range)

    def round_to_levels(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Level indices (int64) of grid positions t in [0, 2^bits - 1], given uniforms u."""
        raise NotImplementedError

    def levels_to_positions(self, q: torch.Tensor, seed: int) -> torch.Tensor:
        """The receiver's grid positions (float64) of the level indices q."""
        raise NotImplementedError

    def quantize(self, z: torch.Tensor, d: int, seed: int,
                 rotations: int) -> tuple[list[float], dict[str, Section]]:
        levels = 1 << self.bits
        if cpu_kernels.usable(z):  # one fused numba pass; the torch lines elsewhere
            indices = buffers.empty(z.numel(), torch.uint8)
            key = fqr.stream_key(seed, self.purpose)
            scales: list[float] = []
            for lo_i, hi_i in value_blocks(d, rotations):
                lo, step = grid(z[lo_i:hi_i], levels, self.dynamic_range)
                grid_kernels.grid_quantize(z[lo_i:hi_i], lo, step, levels, key, lo_i,
                                           self.rule, indices[lo_i:hi_i])
                scales += [lo, step]
            return scales, {"q": Section.from_ints("q", indices, self.bits)}
        u = fqr.uniforms(seed, self.purpose, z.numel(), device=z.device)
        indices = torch.empty(z.numel(), dtype=torch.int64, device=z.device)
        scales: list[float] = []
        for lo_i, hi_i in value_blocks(d, rotations):
            lo, step = grid(z[lo_i:hi_i], levels, self.dynamic_range)
            t = grid_positions(z[lo_i:hi_i], lo, step, levels)
            indices[lo_i:hi_i] = self.round_to_levels(t, u[lo_i:hi_i]).clamp_(0, levels - 1)
            scales += [lo, step]
        return scales, {"q": Section.from_ints("q", indices, self.bits)}

    def validate(self, enc: Encoded) -> None:
        super().validate(enc)
        expect_section(enc, "q", quantized_length(enc.numel, enc.rotations), self.bits)
        self.expect_slice_scales(enc, per_slice=2)
        if any(step < 0 for step in enc.scales[1::2]):
            raise WireError("scales: a grid step (odd entries) is negative")

    def decode_rotated(self, enc: Encoded, device=None) -> torch.Tensor:
        """lo + step * position per slice, float32 (the rotated domain, or x itself)."""
        if cpu_kernels.runs_on(device):
            blocks = [(a, b, lo, step) for (a, b), lo, step in zip(
                value_blocks(enc.numel, enc.rotations), enc.scales[0::2], enc.scales[1::2],
                strict=True)]
            return grid_kernels.grid_dequantize(
                enc.section("q").data, self.bits, blocks,
                quantized_length(enc.numel, enc.rotations),
                fqr.stream_key(enc.seed, self.purpose), self.rule)
        positions = self.levels_to_positions(enc.section("q").ints(device), enc.seed)
        values = torch.empty(positions.numel(), dtype=torch.float32, device=positions.device)
        blocks = value_blocks(enc.numel, enc.rotations)
        for (lo_i, hi_i), lo, step in zip(blocks, enc.scales[0::2], enc.scales[1::2],
                                          strict=True):
            values[lo_i:hi_i] = (lo + step * positions[lo_i:hi_i]).to(torch.float32)
        return values


@register_codec
class Dither(UniformGridCodec):
    """Subtractive dithered uniform quantizer (the inner-product notes, section 4; LPLR
    section 2.1).

    The sender sends floor(t + u) and the receiver, who regenerates the shared dither u,
    rebuilds q - u + 1/2: the error is uniform on a step, independent of the input.
    Parameters as in :class:`UniformGridCodec`.
    """

    name = "dither"
    purpose = fqr.Purpose.DITHER
    rule = grid_kernels.DITHER

    def round_to_levels(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # t + u >= 0, so the int64 cast (truncation) is the floor; torch.floor on
        # float32 is pathologically slow with 2 intra-op threads in torch 2.13 CPU.
        return (t + u).to(torch.int64)

    def levels_to_positions(self, q: torch.Tensor, seed: int) -> torch.Tensor:
        dither = fqr.uniforms(seed, self.purpose, q.numel(), device=q.device)
        return q.to(torch.float64) - dither.to(torch.float64) + 0.5


__all__ = ["Dither", "UniformGridCodec", "grid", "grid_positions", "parse_range",
           "quantized_length", "value_blocks"]
