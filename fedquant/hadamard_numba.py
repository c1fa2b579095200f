"""Numba CPU kernel for one RHT layer of a float32 power-of-two slice.

Contract (see fedquant.hadamard): ``rht(x, seed, layer, offset)`` returns H D x / sqrt(n)
for a 1-D float32 CPU tensor of power-of-two length, with the sign of position i the top
bit of ``hash64(seed, Purpose.ROTATION, (layer << 40) + offset + i)``;
``inverse_rht(y, ...)`` returns D H y / sqrt(n).

The FWHT of n = R * B points is H_R (x) H_B: B-point transforms of the R contiguous rows of
an R x B matrix, then R-point transforms of its columns. The kernel makes exactly two
passes over memory:

1. *rows*: each block of B = 2^12..2^16 floats (in L1 or L2) is read once with its signs
   hashed in-kernel and 1/sqrt(n) folded in, then gets all log2(B) butterfly stages while
   in cache: the first three (strides 1, 2, 4) as one radix-8 butterfly in registers, the
   rest as radix-8/4/2 stages whose inner loops run over contiguous strides (SIMD);
2. *columns*: groups of W columns are gathered into a small contiguous buffer (R x W,
   at most 512 KiB, in L2), transformed by the same radix-8 stages, and written back
   (multiplied by the signs for the inverse).

Every inner loop runs from 0 over an array view: numba's negative-index wraparound check
on ``a[j]`` with a loop starting elsewhere blocks vectorization (about 15x slower stages).

Slices of n <= B need only pass 1; slices that fit in L2 (n <= 2^17) run the column
stages in place, without the gather buffer. The signs use the same SplitMix64 as fedquant.random
in uint64 arithmetic; along a row the counter advances by the golden gamma, so each sign
costs two 64-bit multiplies. ``parallel=True`` runs blocks and column groups over numba
threads (prange): about 2x on two idle cores at d >= 2^20, but much slower when the cores
are shared with other busy processes (as FL clients often are), so the default is serial.
Compiled functions are cached on disk (``cache=True``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedquant import random as fqr
from fedquant.hadamard import sign_index_start

try:
    import numba as nb
except ImportError:  # pragma: no cover - numba is a pinned dependency
    nb = None

AVAILABLE = nb is not None

MIN_BLOCK = 1 << 12  # rows of at least 2^12 floats (16 KiB: L1)
MAX_ROWS = 1 << 9  # ... and at most 2^9 rows, so column groups stay wide (see _layout)
MAX_BLOCK = 1 << 16  # 256 KiB: pass 1 still runs in L2
BUFFER_FLOATS = 1 << 17  # pass-2 column-group buffer: 512 KiB, half of a 1 MiB L2
MIN_WIDTH = 16  # 64 bytes: at least one cache line per row of a column group
IN_PLACE_MAX = 1 << 17  # slices up to 512 KiB run pass 2 in place (no gather buffer)

_GAMMA = np.uint64(fqr.GOLDEN_GAMMA)
_MIX1 = np.uint64(fqr._MIX1)
_MIX2 = np.uint64(fqr._MIX2)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S63 = np.uint64(63)


def _identity(f=None, **_kwargs):
    return f if f is not None else (lambda g: g)


_njit = nb.njit if AVAILABLE else _identity
_prange = nb.prange if AVAILABLE else range


@_njit(cache=True, inline="always")
def _sign(z: np.uint64) -> np.float32:
    """+1/-1 from the top bit of fmix64(z) (the final xor-shift keeps the top bit)."""
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return np.float32(1.0) - np.float32(2.0) * np.float32(z >> _S63)


@_njit(cache=True, inline="always")
def _counter(key: np.uint64, index: np.uint64) -> np.uint64:
    """The SplitMix64 state for counter `index`: key + (index + 1) * gamma (mod 2^64)."""
    return key + (index + np.uint64(1)) * _GAMMA


@_njit(cache=True, inline="always")
def _butterfly8(p0, p1, p2, p3, p4, p5, p6, p7):
    """Three radix-2 stages on eight equal-length views (strides h, 2h, 4h), in place."""
    for j in range(p0.size):  # loops from 0 over views: no wraparound checks, so SIMD
        a0, a1, a2, a3 = p0[j], p1[j], p2[j], p3[j]
        a4, a5, a6, a7 = p4[j], p5[j], p6[j], p7[j]
        b0, b1, b2, b3 = a0 + a1, a0 - a1, a2 + a3, a2 - a3
        b4, b5, b6, b7 = a4 + a5, a4 - a5, a6 + a7, a6 - a7
        c0, c1, c2, c3 = b0 + b2, b1 + b3, b0 - b2, b1 - b3
        c4, c5, c6, c7 = b4 + b6, b5 + b7, b4 - b6, b5 - b7
        p0[j], p1[j], p2[j], p3[j] = c0 + c4, c1 + c5, c2 + c6, c3 + c7
        p4[j], p5[j], p6[j], p7[j] = c0 - c4, c1 - c5, c2 - c6, c3 - c7


@_njit(cache=True, inline="always")
def _butterfly4(p0, p1, p2, p3):
    """Two radix-2 stages on four equal-length views (strides h, 2h), in place."""
    for j in range(p0.size):
        a0, a1, a2, a3 = p0[j], p1[j], p2[j], p3[j]
        s0, d0, s1, d1 = a0 + a1, a0 - a1, a2 + a3, a2 - a3
        p0[j], p1[j], p2[j], p3[j] = s0 + s1, d0 + d1, s0 - s1, d0 - d1


@_njit(cache=True, inline="always")
def _butterfly2(p0, p1):
    for j in range(p0.size):
        a0, a1 = p0[j], p1[j]
        p0[j], p1[j] = a0 + a1, a0 - a1


@_njit(cache=True)
def _stages(a, h):
    """FWHT stages of strides h, 2h, ... < a.size on the whole of `a`, radix 8, 4, 2."""
    m = a.size
    while h * 8 <= m:
        for i in range(0, m, 8 * h):
            _butterfly8(a[i:i + h], a[i + h:i + 2 * h], a[i + 2 * h:i + 3 * h],
                        a[i + 3 * h:i + 4 * h], a[i + 4 * h:i + 5 * h],
                        a[i + 5 * h:i + 6 * h], a[i + 6 * h:i + 7 * h],
                        a[i + 7 * h:i + 8 * h])
        h *= 8
    if h * 4 <= m:
        for i in range(0, m, 4 * h):
            _butterfly4(a[i:i + h], a[i + h:i + 2 * h], a[i + 2 * h:i + 3 * h],
                        a[i + 3 * h:i + 4 * h])
        h *= 4
    if h * 2 <= m:
        for i in range(0, m, 2 * h):
            _butterfly2(a[i:i + h], a[i + h:i + 2 * h])


@_njit(cache=True, inline="always")
def _radix8_registers(a):
    """The first three stages (strides 1, 2, 4) of `a`, 8 values at a time in registers."""
    for j in range(0, a.size, 8):
        a0, a1, a2, a3 = a[j], a[j + 1], a[j + 2], a[j + 3]
        a4, a5, a6, a7 = a[j + 4], a[j + 5], a[j + 6], a[j + 7]
        b0, b1, b2, b3 = a0 + a1, a0 - a1, a2 + a3, a2 - a3
        b4, b5, b6, b7 = a4 + a5, a4 - a5, a6 + a7, a6 - a7
        c0, c1, c2, c3 = b0 + b2, b1 + b3, b0 - b2, b1 - b3
        c4, c5, c6, c7 = b4 + b6, b5 + b7, b4 - b6, b5 - b7
        a[j], a[j + 1], a[j + 2], a[j + 3] = c0 + c4, c1 + c5, c2 + c6, c3 + c7
        a[j + 4], a[j + 5], a[j + 6], a[j + 7] = c0 - c4, c1 - c5, c2 - c6, c3 - c7


@_njit(cache=True, inline="always")
def _signed_scaled_copy(src, dst, z, scale):
    """dst = src * scale * sign, the signs hashed from SplitMix64 state z onwards."""
    for i in range(src.size):
        dst[i] = src[i] * (scale * _sign(z))
        z += _GAMMA


@_njit(cache=True, inline="always")
def _row_block(x, y, key, index, scale, forward):
    """Pass 1 on one block: y = H_m (D x * scale) (forward) or H_m (x * scale) (inverse)."""
    if forward:
        _signed_scaled_copy(x, y, _counter(key, index), scale)
    else:
        for i in range(x.size):
            y[i] = x[i] * scale
    if y.size >= 8:
        _radix8_registers(y)
        _stages(y, 8)
    else:
        _stages(y, 1)


@_njit(cache=True, inline="always")
def _column_group(y, buf, rows, block, c0, key, start, forward):
    """Pass 2 on columns [c0, c0+width): gather, R-point FWHT, scatter (+signs if inverse)."""
    width = buf.size // rows
    for r in range(rows):
        row, col = y[r * block + c0:r * block + c0 + width], buf[r * width:(r + 1) * width]
        for c in range(width):
            col[c] = row[c]
    _stages(buf, width)
    for r in range(rows):
        row, col = y[r * block + c0:r * block + c0 + width], buf[r * width:(r + 1) * width]
        if forward:
            for c in range(width):
                row[c] = col[c]
        else:
            _signed_scaled_copy(col, row, _counter(key, start + np.uint64(r * block + c0)),
                                np.float32(1.0))


def _layout(n: int) -> tuple[int, int, int]:
    """(block, rows, width) of the two-pass schedule for n points.

    Pass 2 gathers each row's `width` floats from a different page: few rows and wide
    groups (>= 1 KiB per row at n = 2^24) keep TLB misses and prefetch stalls down.
    """
    block = min(n, max(MIN_BLOCK, min(MAX_BLOCK, n // MAX_ROWS)))
    rows = n // block
    width = min(block, max(MIN_WIDTH, BUFFER_FLOATS // rows))
    return block, rows, width


@_njit(cache=True, nogil=True)  # releases the GIL: concurrent decodes run in parallel
def _rht_serial(x, y, key, start, scale, forward, block, rows, width):
    for b in range(rows):
        lo = b * block
        _row_block(x[lo:lo + block], y[lo:lo + block], key, start + np.uint64(lo), scale,
                   forward)
    if rows * block <= IN_PLACE_MAX:  # the whole slice is in L2: column stages in place
        _stages(y, block)
        if not forward:
            _signed_scaled_copy(y, y, _counter(key, start), np.float32(1.0))
        return
    buf = np.empty(rows * width, dtype=np.float32)
    for g in range(block // width):
        _column_group(y, buf, rows, block, g * width, key, start, forward)


@_njit(cache=True, parallel=True, nogil=True)
def _rht_parallel(x, y, key, start, scale, forward, block, rows, width):
    for b in _prange(rows):
        lo = b * block
        _row_block(x[lo:lo + block], y[lo:lo + block], key, start + np.uint64(lo), scale,
                   forward)
    if rows * block <= IN_PLACE_MAX:
        _stages(y, block)
        if not forward:
            _signed_scaled_copy(y, y, _counter(key, start), np.float32(1.0))
        return
    for g in _prange(block // width):
        buf = np.empty(rows * width, dtype=np.float32)
        _column_group(y, buf, rows, block, g * width, key, start, forward)


def _check(x: torch.Tensor) -> int:
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 1:
        raise ValueError(f"numba RHT needs a 1-D float32 CPU tensor, got {x.dim()}-D "
                         f"{x.dtype} on {x.device}")
    n = x.numel()
    if n == 0 or n & (n - 1):
        raise ValueError(f"RHT length must be a power of two, got {n}")
    return n


def _run(x: torch.Tensor, seed: int, layer: int, offset: int, forward: bool,
         parallel: bool) -> torch.Tensor:
    if not AVAILABLE:
        raise RuntimeError("numba is not installed; use fedquant.hadamard's torch kernel")
    n = _check(x)
    src = x.detach().contiguous().numpy()  # zero-copy view for contiguous CPU tensors
    # numpy allocates large arrays on transparent huge pages (madvise): at d = 2^24 that
    # avoids ~16k page faults and the column pass's TLB misses
    out = np.empty(n, dtype=np.float32)
    key = np.uint64(fqr.stream_key(seed, fqr.Purpose.ROTATION))
    start = np.uint64(sign_index_start(layer, offset))
    scale = np.float32(1.0 / math.sqrt(n))
    kernel = _rht_parallel if parallel else _rht_serial
    kernel(src, out, key, start, scale, forward, *_layout(n))
    return torch.from_numpy(out)


def rht(x: torch.Tensor, seed: int, layer: int, offset: int = 0,
        parallel: bool = False) -> torch.Tensor:
    """H D x / sqrt(n) for a 1-D float32 CPU tensor of power-of-two length n."""
    return _run(x, seed, layer, offset, True, parallel)


def inverse_rht(y: torch.Tensor, seed: int, layer: int, offset: int = 0,
                parallel: bool = False) -> torch.Tensor:
    """D H y / sqrt(n), the inverse of :func:`rht`."""
    return _run(y, seed, layer, offset, False, parallel)
