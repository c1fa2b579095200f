"""Numba CPU kernels for the uniform-grid quantizers (fedquant.codecs.dither: the
subtractive dither and stochastic rounding), one pass each way.

The torch lines of ``UniformGridCodec`` build the rounding uniforms, the grid positions,
their sum and int64 indices as n-long temporaries (about 14 bytes of traffic per
coordinate before packing, and more on the receiver in float64); these kernels hash each
coordinate's uniform where they use it (fedquant.random's numba SplitMix64, the same
bits as ``fqr.uniforms``) and write uint8 indices, or the float32 values, directly.
Every float operation is the torch code's, in the same precision and order:

* sender: t = clamp((v - float32(lo)) * float32(1 / step), 0, M - 1) in float32; the
  dither sends floor(t + u), stochastic rounding floor(t) + (u < t - floor(t)); both
  clamped to 0..M - 1;
* receiver: float32(lo + step * p) in float64, with p = q - u + 1/2 for the dither and
  p = q for stochastic rounding.

So the indices and values are bit-identical to the torch path's (tests/test_dither.py).
"""

from __future__ import annotations

import numpy as np
import torch

from fedquant import random as fqr
from fedquant._numba import njit
from fedquant.packing import unpack

DITHER, STOCHASTIC = 0, 1  # the rounding rules


@njit(cache=True, nogil=True)
def _quantize(v, lo, inv, top, key, start, rule, out):  # pragma: no cover - jit
    for i in range(v.size):
        t = (v[i] - lo) * inv
        t = min(max(t, np.float32(0.0)), top)
        u = fqr.uniform_numba(key, np.uint64(start + i))
        if rule == DITHER:
            q = np.int64(t + u)  # t + u >= 0: truncation is the floor
        else:
            down = np.int64(t)
            q = down + np.int64(u < t - np.float32(down))
        out[i] = min(max(q, 0), np.int64(top))


@njit(cache=True, nogil=True)
def _dequantize(q, start, lo, step, key, rule, out):  # pragma: no cover - jit
    """out[i] = float32(lo + step * p) of the indices q (coordinate start + i on)."""
    if rule == DITHER:  # one loop per rule: a branch inside would stop vectorization
        for i in range(out.size):
            u = np.float64(fqr.uniform_numba(key, np.uint64(start + i)))
            out[i] = np.float32(lo + step * (np.float64(q[i]) - u + 0.5))
    else:
        for i in range(out.size):
            out[i] = np.float32(lo + step * np.float64(q[i]))


def grid_quantize(v: torch.Tensor, lo: float, step: float, levels: int, key: int,
                  start: int, rule: int, out: torch.Tensor) -> None:
    """Indices (uint8 `out`) of the float32 CPU values v on the grid lo + j * step,
    j < levels <= 256, rounded by `rule` with the uniforms of stream `key` from index
    `start` on."""
    with np.errstate(over="ignore"):  # a subnormal step: inf, as in torch's float32
        inv = np.float32(1.0 / step) if step != 0 else np.float32(0.0)  # step 0: t = 0
    _quantize(v.detach().contiguous().numpy(), np.float32(lo), inv, np.float32(levels - 1),
              np.uint64(key), start, rule, out.numpy())


def grid_dequantize(data: bytes, bits: int, blocks: list[tuple[int, int, float, float]],
                    total: int, key: int, rule: int) -> torch.Tensor:
    """float32 lo + step * p for each block (first index, end, lo, step) of the `total`
    b-bit indices packed in `data` (the receiver of :func:`grid_quantize`)."""
    if any(not 0 <= a <= b <= total for a, b, _, _ in blocks):
        raise ValueError(f"a block lies outside the {total} packed indices")
    q = unpack(data, bits, total, dtype=torch.uint8).numpy()  # ValueError if data is short
    out = np.empty(total, dtype=np.float32)
    for a, b, lo, step in blocks:
        _dequantize(q[a:b], a, float(lo), float(step), np.uint64(key), rule, out[a:b])
    return torch.from_numpy(out)


__all__ = ["DITHER", "STOCHASTIC", "grid_dequantize", "grid_quantize"]
