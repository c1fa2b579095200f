"""Numba CPU kernel for one RHT layer of a float32 power-of-two slice.

Contract (see fedquant.hadamard): ``rht(x, seed, layer, offset)`` returns H D x / sqrt(n)
for a 1-D float32 CPU tensor of power-of-two length, with the sign of position i the top
bit of ``hash64(seed, Purpose.ROTATION, (layer << 40) + offset + i)``;
``inverse_rht(y, ...)`` returns D H y / sqrt(n).

The butterflies are written as explicit 16-lane vector code (LLVM IR emitted through
numba ``@intrinsic``, docs/kernels.md says why):

* strides 1, 2, 4, 8 (inside one 16-float vector): each stage is one lane permutation and
  one fused multiply-add with a +-1 lane pattern, ``y = p + v * s`` (exactly ``a + b`` or
  ``a - b``: multiplying by +-1 is exact and the FMA rounds once);
* strides h >= 16: radix-16/8/4/2 "vertical" butterflies on 16 vectors h floats apart,
  all in registers (four stages per load and store of the data).

The FWHT of n = R * B points is H_R (x) H_B: B-point transforms of the R contiguous rows of
an R x B matrix, then R-point transforms of its columns. Slices of n <= 2^17 floats (in
L2) are one block; longer ones make two passes over memory:

1. *rows*: each row of B = 2^15 floats is processed in L1-sized chunks of 2^13 floats:
   the signs are hashed and 1/sqrt(n) folded in while copying x into y, then the chunk
   gets all its stages while in L1; then the row's remaining stages;
2. *columns*: groups of 1024 columns (4 KiB of every row, a few MiB in all, mostly in
   cache) go through the remaining stages in place, by the same vertical butterflies
   restricted to the group's columns; the inverse multiplies by its signs while the group
   is still in cache.

Stages run in the order of increasing stride, as in the torch kernel, so both kernels
make the same additions in the same order; only the place where 1/sqrt(n) is applied
differs (float tolerance). Signs use fedquant.random's numba SplitMix64: along a row the
counter advances by the golden gamma, so each sign costs two 64-bit multiplies
(vectorized). ``out`` may be a preallocated tensor, or x itself (in place).
``parallel=True`` runs rows and column groups over numba threads (prange); it is not the
default (docs/kernels.md). Compiled functions are cached on disk.

For the encoders, :func:`rht_stats` also sums the float64 moments (sum x^2, sum |x|^3,
sum x^4) of the *input*, chunk by chunk in pass 1 while the chunk is in L1, instead of in
passes of their own: they decide ``rotations="auto"``, give the slice norm (||x|| = ||z||
up to rounding) and, being finite exactly when every entry is, replace the encoders' NaN /
Inf check. Each row block writes its own partial sums, so the parallel kernel stays
race-free and both give the same sums.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from fedquant import buffers
from fedquant import random as fqr
from fedquant._numba import AVAILABLE, njit, prange
from fedquant.vector_ir import LANES

CHUNK = 1 << 13  # 32 KiB: a chunk gets its first stages while in L1
IN_PLACE_MAX = 1 << 17  # slices up to 512 KiB (in L2) are one block: no pass 2
BLOCK = 1 << 15  # longer slices: pass 1 on rows of 128 KiB ...
GROUP_WIDTH = 1 << 10  # ... pass 2 on groups of 1024 columns (4 KiB of every row)
ALIASING_STRIDE = 1 << 10  # floats: 4 KiB, the L1 set-index period

_GAMMA = fqr.GAMMA_U64

if AVAILABLE:
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    from fedquant.cpu_kernels import moments23_kernel, moments_kernel, sum_squares_kernel
    from fedquant.vector_ir import LANE_IDX as _LANE_IDX
    from fedquant.vector_ir import VEC as _VEC
    from fedquant.vector_ir import fma as _fma
    from fedquant.vector_ir import vector_ptr as _vector_ptr

    @intrinsic
    def _lanes16(typingctx, a, index):  # pragma: no cover - numba intrinsic
        """In place: the stages of strides 1, 2, 4, 8 on the 16 floats a[index:index+16]."""

        def codegen(context, builder, sig, args):
            ptr = _vector_ptr(context, builder, sig.args[0], args[0], args[1])
            v = builder.load(ptr, align=4)
            for h in (1, 2, 4, 8):
                partner = builder.shuffle_vector(
                    v, v, ir.Constant(_LANE_IDX, [i ^ h for i in range(LANES)]))
                # low lane i: v[i] + v[i + h]; high lane: v[i - h] - v[i], as one FMA
                pattern = ir.Constant(_VEC, [-1.0 if i & h else 1.0 for i in range(LANES)])
                v = _fma(builder, v, pattern, partner)
            builder.store(v, ptr, align=4)
            return context.get_dummy_value()

        return types.void(a, types.intp), codegen

    def _vertical(radix: int):
        """An intrinsic f(a, base, h): log2(radix) stages of strides h, 2h, ... on the
        radix vectors a[base + k*h : base + k*h + 16], k < radix, all in registers."""

        @intrinsic
        def butterfly(typingctx, a, base, h):  # pragma: no cover - numba intrinsic
            def codegen(context, builder, sig, args):
                arr, start, stride = args
                ptrs = [_vector_ptr(context, builder, sig.args[0], arr,
                                    builder.add(start, builder.mul(
                                        stride, ir.Constant(stride.type, k))))
                        for k in range(radix)]
                v = [builder.load(p, align=4) for p in ptrs]
                s = 1
                while s < radix:
                    nxt = list(v)
                    for k in range(radix):
                        if not k & s:
                            nxt[k] = builder.fadd(v[k], v[k + s])
                            nxt[k + s] = builder.fsub(v[k], v[k + s])
                    v, s = nxt, 2 * s
                for p, value in zip(ptrs, v, strict=True):
                    builder.store(value, p, align=4)
                return context.get_dummy_value()

            return types.void(a, types.intp, types.intp), codegen

        return butterfly

    _vertical2, _vertical4, _vertical8, _vertical16 = (_vertical(r) for r in (2, 4, 8, 16))


@njit(cache=True)
def _vertical_pass(a, lo, size, h, radix, c0, width, row):  # pragma: no cover - jit
    """log2(radix) stages of strides h .. radix * h / 2 on a[lo:lo+size] (h >= 16),
    restricted to the columns [c0, c0 + width) of rows of length `row` (row = width = h
    for all of a; the column groups of pass 2 use row = block)."""
    for i in range(lo, lo + size, radix * h):
        for r in range(i + c0, i + h, row):
            if radix == 16:
                for j in range(r, r + width, LANES):
                    _vertical16(a, j, h)
            elif radix == 8:
                for j in range(r, r + width, LANES):
                    _vertical8(a, j, h)
            elif radix == 4:
                for j in range(r, r + width, LANES):
                    _vertical4(a, j, h)
            else:
                for j in range(r, r + width, LANES):
                    _vertical2(a, j, h)


@njit(cache=True)
def _stages_from(a, lo, size, h, c0=0, width=0, row=0):  # pragma: no cover - jit
    """All stages of strides h .. size / 2 on a[lo:lo+size] (h >= 16), in as few passes
    as possible, the stages split evenly between the passes; optionally only on the
    columns [c0, c0 + width) of rows of length `row` (see :func:`_vertical_pass`).

    A pass holds at most 16 vectors (four stages) while their stride is short, 8 (three
    stages) once it is a multiple of 4 KiB: 16 such vectors fall into one set of the
    12-way L1 cache and evict each other."""
    if width == 0:
        width = row = h
    left = 0
    while (h << left) < size:
        left += 1
    while left > 0:
        most = 4 if h < ALIASING_STRIDE else 3
        passes = (left + most - 1) // most
        k = (left + passes - 1) // passes
        if width == row:  # whole rows: the passes over every column at once
            _vertical_pass(a, lo, size, h, 1 << k, 0, h, h)
        else:
            _vertical_pass(a, lo, size, h, 1 << k, c0, width, row)
        h <<= k
        left -= k


@njit(cache=True)
def _scalar_stages(a, lo, size):  # pragma: no cover - jit
    """Every stage on a[lo:lo+size], radix 2 (slices shorter than one vector)."""
    h = 1
    while h < size:
        for i in range(lo, lo + size, 2 * h):
            for j in range(i, i + h):
                u, v = a[j], a[j + h]
                a[j], a[j + h] = u + v, u - v
        h *= 2


@njit(cache=True, inline="always")
def _all_stages(a, lo, size):  # pragma: no cover - jit
    """Every stage, from stride 1, on a[lo:lo+size]."""
    if size < LANES:
        _scalar_stages(a, lo, size)
        return
    for j in range(lo, lo + size, LANES):
        _lanes16(a, j)
    _stages_from(a, lo, size, LANES)


@njit(cache=True, inline="always")
def _signed_scaled_copy(src, dst, z, scale):  # pragma: no cover - jit
    """dst = src * scale * sign, the signs hashed from SplitMix64 state z onwards."""
    for i in range(src.size):
        dst[i] = src[i] * (scale * fqr.sign_numba(z))
        z += _GAMMA


@njit(cache=True, inline="always")
def _apply_signs(a, z, scale):  # pragma: no cover - jit
    """a *= scale * sign in place, the signs hashed from SplitMix64 state z onwards (one
    array: no aliasing check, so the loop vectorizes)."""
    for i in range(a.size):
        a[i] *= scale * fqr.sign_numba(z)
        z += _GAMMA


@njit(cache=True, inline="always")
def _row_block(x, y, lo, size, key, index, scale, forward, inplace, mom, b,
               want):  # pragma: no cover - jit
    """Pass 1 on y[lo:lo+size]: H (D x * scale) (forward) or H (x * scale) (inverse),
    chunk by chunk in L1, then the block's remaining stages. `inplace`: x is y. `mom`
    ((rows, 3) float64, or no rows): row b gets the first `want` (1..3) moments of
    x[lo:lo+size], read chunk by chunk while in L1 (x is not y)."""
    chunk = min(size, CHUNK)
    if mom.shape[0]:
        mom[b, 0] = mom[b, 1] = mom[b, 2] = 0.0
    for c in range(lo, lo + size, chunk):
        if mom.shape[0]:
            if want == 1:
                mom[b, 0] += sum_squares_kernel(x[c:c + chunk])
            elif want == 2:
                s2, s3 = moments23_kernel(x[c:c + chunk])
                mom[b, 0] += s2
                mom[b, 1] += s3
            else:
                s2, s3, s4 = moments_kernel(x[c:c + chunk])
                mom[b, 0] += s2
                mom[b, 1] += s3
                mom[b, 2] += s4
        dst = y[c:c + chunk]
        if inplace:  # one array: no aliasing check, so the loops vectorize
            if forward:
                _apply_signs(dst, fqr.counter_numba(key, index + np.uint64(c - lo)), scale)
            else:
                for i in range(chunk):
                    dst[i] *= scale
        elif forward:
            _signed_scaled_copy(x[c:c + chunk], dst,
                                fqr.counter_numba(key, index + np.uint64(c - lo)), scale)
        else:
            src = x[c:c + chunk]
            for i in range(chunk):  # from 0 over views: no wraparound checks, so SIMD
                dst[i] = src[i] * scale
        _all_stages(y, c, chunk)
    if size > chunk:
        _stages_from(y, lo, size, chunk)


@njit(cache=True, inline="always")
def _column_group(y, block, c0, width, key, start, forward):  # pragma: no cover - jit
    """Pass 2 on the columns [c0, c0 + width) of y seen as rows of `block` floats: the
    R-point FWHTs of those columns (rows x width floats, about 2 MiB, mostly in cache),
    then the inverse's signs while the group is still in cache."""
    _stages_from(y, 0, y.size, block, c0, width, block)
    if not forward:
        for lo in range(c0, y.size, block):
            _apply_signs(y[lo:lo + width], fqr.counter_numba(key, start + np.uint64(lo)),
                         np.float32(1.0))


def _layout(n: int) -> tuple[int, int, int]:
    """(block, rows, width) of the two-pass schedule for n points: one block when the
    slice fits in L2, else rows of BLOCK floats and column groups GROUP_WIDTH wide."""
    if n <= IN_PLACE_MAX:
        return n, 1, n
    return BLOCK, n // BLOCK, GROUP_WIDTH


@njit(cache=True, nogil=True)  # releases the GIL: concurrent decodes run in parallel
def _rht_serial(x, y, key, start, scale, forward, inplace, block, rows, width, mom,
                want):  # pragma: no cover - jit
    """`mom`: (rows, 3) float64, each row block's first `want` input moments, or (0, 3)."""
    for b in range(rows):
        _row_block(x, y, b * block, block, key, start + np.uint64(b * block), scale, forward,
                   inplace, mom, b, want)
    if rows == 1:  # the slice is one block (in L2): done but for the inverse's signs
        if not forward:
            _apply_signs(y, fqr.counter_numba(key, start), np.float32(1.0))
        return
    for g in range(block // width):
        _column_group(y, block, g * width, width, key, start, forward)


@njit(cache=True, parallel=True, nogil=True)
def _rht_parallel(x, y, key, start, scale, forward, inplace, block, rows, width, mom,
                  want):  # pragma: no cover - jit
    for b in prange(rows):
        _row_block(x, y, b * block, block, key, start + np.uint64(b * block), scale, forward,
                   inplace, mom, b, want)
    if rows == 1:
        if not forward:
            _apply_signs(y, fqr.counter_numba(key, start), np.float32(1.0))
        return
    for g in prange(block // width):
        _column_group(y, block, g * width, width, key, start, forward)


@functools.lru_cache(maxsize=1024)
def _rotation_key(seed: int) -> np.uint64:
    """The ROTATION stream key of a seed (cached: every layer and slice of a rotation
    asks for it)."""
    return np.uint64(fqr.stream_key(seed, fqr.Purpose.ROTATION))


def _view(x: torch.Tensor, what: str) -> np.ndarray:
    """x as a numpy view (a contiguous copy if it is strided); ValueError unless it is a
    1-D float32 CPU tensor of power-of-two length. (Checked on the tensor's cheapest
    attributes: every encode and decode makes a few of these calls.)"""
    if not x.is_cpu or x.dtype != torch.float32 or x.dim() != 1:
        raise ValueError(f"numba RHT needs a 1-D float32 CPU tensor as {what}, got "
                         f"{x.dim()}-D {x.dtype} on {x.device}")
    n = x.numel()
    if n == 0 or n & (n - 1):
        raise ValueError(f"RHT length must be a power of two, got {n}")
    a = (x.detach() if x.requires_grad else x).numpy()
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


@functools.lru_cache(maxsize=64)
def _shape(n: int) -> tuple[np.float32, int, int, int]:
    """(1/sqrt(n), block, rows, width) of an n-point RHT."""
    return (np.float32(1.0 / math.sqrt(n)), *_layout(n))


_NO_MOMENTS = np.zeros((0, 3))


def _run(x: torch.Tensor, seed: int, layer: int, offset: int, forward: bool,
         parallel: bool, out: torch.Tensor | None, want: int = 0
         ) -> tuple[torch.Tensor, np.ndarray]:
    """(the transform, written into `out` or a fresh tensor; the (rows, 3) float64 input
    moments, the first `want` of each row, when `want` > 0)."""
    if not AVAILABLE:
        raise RuntimeError("numba is not installed; use fedquant.hadamard's torch kernel")
    src = _view(x, "input")
    n = src.size
    if out is None:
        # on transparent huge pages (fedquant.buffers): at d = 2^24 that avoids ~16k page
        # faults and the column pass's TLB misses
        out = buffers.empty(n)
        dst = out.numpy()
        inplace = False
    else:
        dst = _view(out, "out")
        if dst.size != n or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 tensor of {n} elements")
        a, b = x.data_ptr(), out.data_ptr()
        inplace = a == b and x.is_contiguous()  # a strided x was copied into src
        if not inplace and x.is_contiguous() and a < b + 4 * n and b < a + 4 * n:
            raise ValueError("out overlaps the input without being the same memory")
    scale, block, rows, width = _shape(n)
    mom = np.empty((rows, 3)) if want else _NO_MOMENTS
    if want and inplace:
        raise ValueError("the input's moments need an out-of-place transform")
    kernel = _rht_parallel if parallel else _rht_serial
    kernel(src, dst, _rotation_key(seed), np.uint64(fqr.rotation_sign_index(layer, offset)),
           scale, forward, inplace, block, rows, width, mom, want)
    return out, mom


def rht(x: torch.Tensor, seed: int, layer: int, offset: int = 0, parallel: bool = False,
        out: torch.Tensor | None = None) -> torch.Tensor:
    """H D x / sqrt(n) for a 1-D float32 CPU tensor of power-of-two length n, written
    into `out` if given (which may be x itself: in place)."""
    return _run(x, seed, layer, offset, True, parallel, out)[0]


def rht_stats(x: torch.Tensor, seed: int, layer: int, offset: int = 0,
              out: torch.Tensor | None = None, moments: int = 1, parallel: bool = False
              ) -> tuple[torch.Tensor, tuple[float, ...]]:
    """:func:`rht` (into `out`, which must not be x), and the first `moments` (1..3) of
    the float64 (sum x^2, sum |x|^3, sum x^4) of the input, summed in the same pass."""
    if moments not in (1, 2, 3):
        raise ValueError(f"moments must be 1, 2 or 3, got {moments!r}")
    out, mom = _run(x, seed, layer, offset, True, parallel, out, moments)
    sums = mom[0] if mom.shape[0] == 1 else mom.sum(axis=0)  # (numpy's sum costs ~3 us)
    return out, tuple(sums[:moments].tolist())


def inverse_rht(y: torch.Tensor, seed: int, layer: int, offset: int = 0,
                parallel: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """D H y / sqrt(n), the inverse of :func:`rht` (into `out` if given, may be y)."""
    return _run(y, seed, layer, offset, False, parallel, out)[0]
