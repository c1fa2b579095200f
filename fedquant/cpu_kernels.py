"""Numba CPU kernels for the hot loops of rotation-based codecs (float32 CPU tensors).

Each kernel fuses what the torch code does in several full passes (and float64 copies)
into one or two passes; the torch code stays the path for every other device and the
reference these kernels are tested against:

* :func:`moments` - the float64 sums of x^2, |x|^3 and x^4 behind ``rotation.flatness``
  (the RHT paper ("Quantizing With Randomized Hadamard Transforms: Efficient Heuristic Now
Proven", 2026) section 7's l3 / l4 checks) in one pass, no float64 copy of x;
* :func:`eden_quantize` - EDEN's per-slice work (the RHT paper section 4): the float64 norm,
  t = z * sqrt(n) / ||z||, the nearest Lloyd-Max centroid (``torch.bucketize`` on the
  midpoints: the index is the number of midpoints strictly below t) and the float64
  <z, c> of the unbiased / least-squares scale, indices as uint8. For b <= 2 the dot
  and ||z||^2 are summed in the quantizing pass; given a norm hint (||x||, from the
  RHT's first pass) that is the only pass (rarely two), else a norm pass comes first;
  above b = 2 one more pass for the dot. ``moments_kernel`` and friends are the same
  sums for the RHT kernel's pass 1 (fedquant.hadamard_numba.rht_stats);
* :func:`eden_dequantize` - EDEN's receiver: unpack the b-bit indices and look up
  float32(centroid * scale) per slice in one pass, no int64 / float64 temporaries (for
  b = 1, 2, 4, 8 one word-sized table entry per byte);
* :func:`sum_squares`, :func:`axpy`, :func:`divide_to_float32` - a float64 sum of squares,
  total += w * values into a float64 total, and float32(total / divisor), each one pass
  with no float64 copy (the server's mean).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from fedquant import buffers
from fedquant._numba import AVAILABLE, nb
from fedquant.packing import padded_bytes, read_bits

# b -> the numpy type whose one (two for b = 1) element(s) hold the float32 values of a byte
_BYTE_WORDS = {1: np.complex128, 2: np.complex128, 4: np.uint64, 8: np.uint32}
# fastmath for the float64 sums: "reassoc" lets them vectorize (another summation order,
# as torch's own blocked sums have), "contract" fuses each multiply-add into one FMA
# (rounded once); no other float semantics change
SUMS = {"reassoc", "contract"}
COUNT_MAX_MIDS = 15  # up to b = 4 the unrolled midpoint count beats binary lifting
FUSED_DOT_MAX_MIDS = 3  # b <= 2: <z, c> summed in the quantizing pass


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels apply: numba present, float32 CPU tensor."""
    return AVAILABLE and x.device.type == "cpu" and x.dtype == torch.float32


def runs_on(device: torch.device | str | None) -> bool:
    """Whether a receiver's kernels make its output for `device`: numba present, and the
    CPU (None means the CPU)."""
    return AVAILABLE and buffers.on_cpu(device)


if AVAILABLE:

    @nb.njit(cache=True, fastmath=SUMS)
    def _moments(x):
        s2 = 0.0
        s3 = 0.0
        s4 = 0.0
        for i in range(x.size):
            v = np.float64(x[i])
            a2 = v * v
            s2 += a2
            s3 += a2 * abs(v)
            s4 += a2 * a2
        return s2, s3, s4

    @nb.njit(cache=True, fastmath=SUMS)
    def _moments23(x):
        """(sum x^2, sum |x|^3): :func:`_moments` without x^4 (the scalar auto check)."""
        s2 = 0.0
        s3 = 0.0
        for i in range(x.size):
            v = np.float64(x[i])
            a2 = v * v
            s2 += a2
            s3 += a2 * abs(v)
        return s2, s3

    @nb.njit(cache=True, fastmath=SUMS)
    def _sum_squares(z):
        s = 0.0
        for i in range(z.size):
            v = np.float64(z[i])
            s += v * v
        return s

    # the same sums inside the RHT's passes (fedquant.hadamard_numba.rht_stats)
    moments_kernel, moments23_kernel, sum_squares_kernel = _moments, _moments23, _sum_squares

    @nb.njit(cache=True, fastmath=SUMS)
    def _quantize_count(z, factor, mids, centroids, out):
        """b <= 4: the index is a branch-free count of the midpoints below t, and the
        float64 <z, c> and ||z||^2 are summed in the same pass, c picked by the same
        comparisons (the last midpoint below t names c exactly). `mids` and `centroids`
        are tuples, so their lengths are compile-time constants: the inner loop unrolls
        and the loop over i vectorizes (one compiled variant per b). Returns
        (<z, c>, ||z||^2)."""
        dot = 0.0
        sq = 0.0
        for i in range(z.size):
            v = z[i]
            t = v * factor
            k = np.uint8(0)
            c = centroids[0]
            for m in range(len(mids)):
                up = mids[m] < t
                k += np.uint8(up)
                c = centroids[m + 1] if up else c
            out[i] = k
            w = np.float64(v)
            dot += w * c
            sq += w * w
        return dot, sq

    @nb.njit(cache=True)
    def _quantize_count_only(z, factor, mids, out):
        """:func:`_quantize_count` without the dot (b = 3, 4)."""
        for i in range(z.size):
            t = z[i] * factor
            k = np.uint8(0)
            for m in range(len(mids)):
                k += np.uint8(mids[m] < t)
            out[i] = k

    @nb.njit(cache=True)
    def _quantize_lift(z, factor, mids, out):
        """b >= 5: the index by binary lifting over the 2^b - 1 sorted midpoints (add each
        power of two whose midpoint is still below t), one level at a time over all
        values: each level is a branch-free loop (about 5x faster than per-value search)."""
        pos = np.zeros(z.size, dtype=np.int32)
        step = (mids.size + 1) >> 1
        while step > 0:
            for i in range(z.size):
                p = pos[i]
                pos[i] = p + (step if mids[p + step - 1] < z[i] * factor else 0)
            step >>= 1
        for i in range(z.size):
            out[i] = pos[i]


    @nb.njit(cache=True, nogil=True)  # releases the GIL: concurrent decodes in parallel
    def _dequantize(data, bits, start, table, out):
        """out[j] = table[value start + j of the b-bit stream `data`] (fedquant.packing's
        layout; `data` ends with one extra zero byte for the 16-bit window)."""
        for j in range(out.size):
            out[j] = table[read_bits(data, bits, start + j)]

    @nb.njit(cache=True, nogil=True)
    def _dequantize_bytes(data, first, rows, out):
        """out[i] = rows[data[first + i]]: each byte's values as one wide word (the float32
        values of a byte viewed as uint32 / uint64 / complex128: bit-exact moves)."""
        for i in range(out.size):
            out[i] = rows[data[first + i]]

    @nb.njit(cache=True, nogil=True)
    def _dequantize_bytes2(data, first, rows, out):
        """As :func:`_dequantize_bytes` with two words per byte (b = 1: 8 values)."""
        for i in range(out.size >> 1):
            b = np.int64(data[first + i]) << 1
            out[2 * i] = rows[b]
            out[2 * i + 1] = rows[b + 1]

    @nb.njit(cache=True, nogil=True)  # releases the GIL: workers add in parallel
    def _axpy(total, values, weight):
        for i in range(values.size):
            total[i] += weight * np.float64(values[i])

    @nb.njit(cache=True, nogil=True)
    def _divide_to_float32(total, divisor, out):
        for i in range(total.size):
            out[i] = np.float32(total[i] / divisor)

    @nb.njit(cache=True, fastmath=SUMS)
    def _dot_centroids(z, idx, centroids):
        """(<z, centroids[idx]>, ||z||^2) in float64, one pass."""
        dot = 0.0
        sq = 0.0
        for i in range(z.size):
            w = np.float64(z[i])
            dot += w * centroids[idx[i]]
            sq += w * w
        return dot, sq


def moments(x: torch.Tensor) -> tuple[float, float, float]:
    """(sum x^2, sum |x|^3, sum x^4) in float64 of a 1-D float32 CPU tensor."""
    return _moments(x.detach().contiguous().numpy())


def sum_squares(z: torch.Tensor) -> float:
    """sum z^2 in float64 of a 1-D float32 CPU tensor, one pass, no float64 copy."""
    return _sum_squares(z.detach().contiguous().numpy())


def axpy(total: torch.Tensor, values: torch.Tensor, weight: float) -> None:
    """total += weight * values in one pass: float64 CPU `total`, float32 CPU `values`."""
    _axpy(total.numpy(), values.detach().contiguous().numpy(), weight)


def divide_to_float32(total: torch.Tensor, divisor: float, out: torch.Tensor) -> None:
    """out = float32(total / divisor) in one pass: float64 CPU `total`, float32 CPU `out`
    (the same values as ``(total / divisor).to(torch.float32)``, without its temporary)."""
    _divide_to_float32(total.numpy(), float(divisor), out.numpy())


# the smallest float64 that rounds to inf in float32 (FLT_MAX plus half an ulp)
_FLOAT32_INF_FROM = float(np.finfo(np.float32).max) + 2.0**103


def factor_of(size: int, norm: float) -> np.float32:
    """sqrt(n) / ||z||, the float32 factor of t; 0 for an all-zero slice (it quantizes to
    any index, its scale is 0: no inf factor). A subnormal norm gives inf, as torch's
    float32 multiply would, without numpy's overflow warning (and without
    ``np.errstate``, which costs a microsecond a call)."""
    factor = math.sqrt(size) / norm if norm > 0 else 0.0
    return np.float32(factor if factor < _FLOAT32_INF_FROM else math.inf)


@functools.lru_cache(maxsize=64)
def _tables(centroids: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, tuple, tuple]:
    """(centroids, float32 midpoints, and both as tuples of scalars) of a codebook."""
    c64 = np.array(centroids, dtype=np.float64)
    mids = ((c64[1:] + c64[:-1]) / 2).astype(np.float32)
    return c64, mids, tuple(np.float32(m) for m in mids), tuple(float(c) for c in c64)


def eden_quantize(zs: torch.Tensor, centroids: torch.Tensor, out: torch.Tensor,
                  norm_hint: float | None = None) -> tuple[float, float]:
    """EDEN's quantization of one rotated slice zs (float32 CPU, 1-D).

    Writes the nearest-centroid index of t = zs * sqrt(n) / ||zs|| into `out` (uint8,
    same length) and returns (||zs||, <zs, centroids[out]>), both float64.

    `norm_hint`: a value equal to ||zs|| up to float rounding (the norm of the rotation's
    input, summed in the RHT's first pass): the indices are taken with its factor while
    ||zs|| is summed in the same pass, and taken again in the rare case that the exact
    norm gives another float32 factor, so the result is the same as without a hint but
    for the order of the float64 sums. None: one pass sums ||zs|| first.
    """
    z = zs.detach().contiguous().numpy()
    exact = norm_hint is None
    norm = math.sqrt(_sum_squares(z)) if exact else norm_hint
    c64, mids, mids_t, c_t = _tables(tuple(centroids.tolist()))
    idx = out.numpy()
    factor = factor_of(z.size, norm)
    while True:
        if mids.size <= FUSED_DOT_MAX_MIDS:
            dot, sq = _quantize_count(z, factor, mids_t, c_t, idx)
        else:
            if mids.size <= COUNT_MAX_MIDS:
                _quantize_count_only(z, factor, mids_t, idx)
            else:
                _quantize_lift(z, factor, mids, idx)
            # longer select chains stop vectorizing: count, then the gathered dot
            dot, sq = _dot_centroids(z, idx, c64)
        if exact:
            return norm, dot
        norm, hinted, exact = math.sqrt(sq), factor, True
        factor = factor_of(z.size, norm)
        if factor == hinted:
            return norm, dot


def scaled_table(c64: np.ndarray, scale: float) -> np.ndarray:
    """float32(c64 * scale): a receiver's codebook for one slice, the float64 product
    rounded once (Inf past float32, which the decoders' finite check refuses)."""
    with np.errstate(over="ignore"):
        return (c64 * scale).astype(np.float32)


@functools.cache
def _byte_codes(bits: int) -> np.ndarray:
    """For b = 1, 2, 4, 8: row j holds the 8 / b values packed in the byte j."""
    per_byte = 8 // bits
    return (np.arange(256)[:, None] >> (bits * np.arange(per_byte))) & ((1 << bits) - 1)


def eden_dequantize(data: bytes, bits: int, centroids: torch.Tensor,
                    slices: list[tuple[int, int, float]], total: int) -> torch.Tensor:
    """float32 values[offset + j] = float32(centroids[q] * scale) for each (offset, size,
    scale) slice, q the b-bit indices packed in `data` (``total`` of them)."""
    if len(data) != (total * bits + 7) // 8 or any(
            o < 0 or s < 0 or o + s > total for o, s, _ in slices):
        raise ValueError(f"packed indices: {len(data)} bytes do not hold {total} values "
                         f"of {bits} bits, or a slice lies outside them")  # no OOB reads
    raw = np.frombuffer(data, dtype=np.uint8)
    padded = None  # the copy with read_bits' extra zero byte, made only if needed
    c64 = centroids.to(torch.float64).cpu().numpy()
    out = np.empty(total, dtype=np.float32)
    per_byte = 8 // bits if 8 % bits == 0 else 0
    for offset, size, scale in slices:
        table = scaled_table(c64, scale)
        if per_byte and offset % per_byte == 0 and size % per_byte == 0:
            # b = 1, 2, 4, 8: one byte holds whole values; a 256-row table of their
            # float32 values turns each byte into one small copy (no per-value shifts)
            rows = table[_byte_codes(bits)].reshape(-1)
            word = _BYTE_WORDS[bits]
            kernel = _dequantize_bytes2 if bits == 1 else _dequantize_bytes
            kernel(raw, offset // per_byte, rows.view(word),
                   out[offset: offset + size].view(word))
        else:
            if padded is None:
                padded = padded_bytes(data)
            _dequantize(padded, bits, offset, table, out[offset: offset + size])
    return torch.from_numpy(out)
