"""QSGD: stochastic rounding of |x_i| / ||x|| to s levels, with the sign, one norm per tensor.

Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding"
(NeurIPS 2017), section 3.1: Q_s(x_i) = ||x|| * sign(x_i) * xi_i(x, s) / s, where
xi_i = l + 1 with probability |x_i| s / ||x|| - l (l = floor(|x_i| s / ||x||)), else l, so
E Q_s(x) = x. ``norm="l2"`` is the paper's; ``norm="linf"`` (max |x_i|) is the common
variant with far smaller variance at large d. The rounding uniforms are the sender's
private randomness (``Purpose.PRIVATE``): the receiver needs none of them. Each coordinate
travels as sign(x_i) * xi_i + s in ceil(log2(2s + 1)) bits (the sign is counted; the
paper's Elias coding is not used); the norm is one float64 scale.

Example::

    enc = fq.get_codec("qsgd", levels=7, norm="linf").encode(grad, seed=11)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedquant import buffers, cpu_kernels
from fedquant import random as fqr
from fedquant._numba import njit
from fedquant.codecs.base import (
    FLOAT32_MAX,
    Codec,
    check_input,
    check_seed,
    expect_scales,
    expect_section,
    register_codec,
)
from fedquant.codecs.rotated import slice_norm
from fedquant.packing import unpack
from fedquant.wire import Encoded, Section, WireError

NORMS = ("l2", "linf")
MAX_LEVELS = 127


def code_bits(levels: int) -> int:
    """Bits per coordinate for the 2s + 1 signed levels."""
    return math.ceil(math.log2(2 * levels + 1))


# The numba CPU kernels: the torch lines' float64 operations, in the same order, one pass
# each way with no n-long float64 temporaries (at d = 2^24 the torch sender made ten).
@njit(cache=True, nogil=True)
def _encode_levels(x, factor, s, key, out):  # pragma: no cover - jit
    """out[i] = sign(x_i) xi_i + s as uint8, xi_i the stochastic rounding of
    |x_i| * factor with the uniforms64 of stream `key`, capped at s."""
    for i in range(x.size):
        w = np.float64(x[i])
        level = abs(w) * factor
        lower = np.floor(level)
        up = fqr.uniform64_numba(key, np.uint64(i)) < level - lower
        xi = min(lower + (1.0 if up else 0.0), np.float64(s))
        out[i] = np.uint8(np.int64(-xi if w < 0 else xi) + s)


@njit(cache=True, nogil=True)
def _decode_levels(codes, s, step, out):  # pragma: no cover - jit
    """out[i] = float32((codes[i] - s) * step)."""
    for i in range(out.size):
        out[i] = np.float32(np.float64(np.int64(codes[i]) - s) * step)


@register_codec
class Qsgd(Codec):
    """QSGD with s levels (unbiased).

    Args:
        levels (int, default 1): s, the number of positive levels, 1..127.
        norm (str, default "l2"): "l2" or "linf", the norm that scales the levels.
    """

    name = "qsgd"
    unbiased = True

    def __init__(self, levels: int = 1, norm: str = "l2"):
        if not isinstance(levels, int) or not 1 <= levels <= MAX_LEVELS:
            raise ValueError(f"levels must be an integer in 1..{MAX_LEVELS}, got {levels!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.levels, self.norm = levels, norm

    def encode(self, x: torch.Tensor, seed: int = 0) -> Encoded:
        flat = check_input(x)
        seed = check_seed(seed)
        if self.norm == "l2":
            scale = slice_norm(flat)
        elif flat.numel():
            low, high = torch.aminmax(flat)  # max |x| without an n-long |x|
            scale = max(-float(low), float(high))
        else:
            scale = 0.0
        if scale > FLOAT32_MAX:  # the receiver's +-scale would be Inf
            raise ValueError(f"qsgd: the input is too large to encode: its {self.norm} norm "
                             f"{scale:.3g} passes float32's range")
        s = self.levels
        factor = s / scale if scale > 0 else 0.0
        if cpu_kernels.usable(flat):
            codes = buffers.empty(flat.numel(), torch.uint8)
            _encode_levels(flat.numpy(), factor, s,
                           np.uint64(fqr.stream_key(seed, fqr.Purpose.PRIVATE)), codes.numpy())
        else:
            wide = flat.to(torch.float64)
            level = wide.abs() * factor
            lower = torch.floor(level)
            u = fqr.uniforms64(seed, fqr.Purpose.PRIVATE, flat.numel(), flat.device)
            xi = (lower + (u < level - lower).to(torch.float64)).clamp_(max=s)
            codes = torch.where(wide < 0, -xi, xi).to(torch.int64) + s
        return self._new_encoded(
            x, seed, scales=(scale,),
            sections={"levels": Section.from_ints("levels", codes, code_bits(s))})

    def validate(self, enc: Encoded) -> None:
        expect_section(enc, "levels", enc.numel, code_bits(self.levels))
        expect_scales(enc, 1)
        if enc.scales[0] < 0:
            raise WireError(f"scales[0]: the norm must be non-negative, got {enc.scales[0]}")
        self._codes(enc)

    def _codes(self, enc: Encoded, device=None) -> torch.Tensor:
        """The uint8 codes, WireError if one is past 2s."""
        section = enc.section("levels")
        codes = unpack(section.data, section.bits, section.count, device, dtype=torch.uint8)
        if codes.numel() and int(codes.max()) > 2 * self.levels:  # no n-long bool temporary
            raise WireError(f"sections['levels']: a code exceeds 2 * levels = {2 * self.levels}")
        return codes

    def decode(self, enc: Encoded, device=None) -> torch.Tensor:
        codes = self._codes(enc, device)
        step = enc.scales[0] / self.levels
        if cpu_kernels.runs_on(device):
            out = buffers.empty(codes.numel())
            _decode_levels(codes.numpy(), self.levels, step, out.numpy())
            return out
        signed = (codes.to(torch.int64) - self.levels).to(torch.float64)
        return (signed * step).to(torch.float32)
