"""Shared randomness: a counter-based generator keyed by (seed, purpose, index).

Every random sign, dither, subset and shared-randomness index in fedquant comes from
``hash64(seed, purpose, index)``, the SplitMix64 output function applied to a counter
(ARCHITECTURE.md, "Shared randomness"). Because it is pure integer arithmetic modulo 2^64,
the sender and the receiver regenerate bit-identical numbers on CPU or CUDA, from torch,
numpy or numba, on any platform and library version. No ``torch.Generator`` stream is
ever part of the wire contract.

The torch path works on int64 tensors: multiplication wraps modulo 2^64 exactly as uint64
does, and logical right shifts are emulated with a mask (torch's ``>>`` is arithmetic).

Example::

    signs = fq.random.signs(seed=7, purpose=fq.random.Purpose.ROTATION, n=1024)
"""

from __future__ import annotations

import enum
import math

import numpy as np
import torch

from fedquant import buffers
from fedquant._numba import AVAILABLE, njit

MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


class Purpose(enum.IntEnum):
    """What a stream of random numbers is for; each purpose gets an independent stream."""

    ROTATION = 1  # sign diagonals of the RHTs (layer l at counter (l << 40) + position)
    DITHER = 2  # subtractive dither / stochastic rounding uniforms
    SUBSET = 3  # random subsets (randk, timeshare, sparsification)
    SKETCH = 4  # Gaussian sketch matrices
    SHARED_INDEX = 5  # QUIC-FL shared-randomness index h
    CLIENT = 6  # per-client seed derivation
    PRIVATE = 7  # private (non-shared) randomness of a sender


def fmix64(z: int) -> int:
    """SplitMix64's output function on a Python int (mod 2^64)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & MASK64
    return z ^ (z >> 31)


ROTATION_LAYER_SHIFT = 40


def rotation_sign_index(layer: int, offset: int) -> int:
    """Counter, in the (seed, ROTATION) stream, of the sign of composed RHT `layer` at
    position `offset` of the padded rotated vector: (layer << 40) + offset."""
    return (layer << ROTATION_LAYER_SHIFT) + offset


def stream_key(seed: int, purpose: int) -> int:
    """The 64-bit key of the stream (seed, purpose)."""
    if seed < 0 or seed > MASK64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    return fmix64(seed ^ fmix64(int(purpose) * GOLDEN_GAMMA))


def hash64(seed: int, purpose: int, index: int) -> int:
    """One 64-bit random number: the reference definition every backend must match."""
    return fmix64(stream_key(seed, purpose) + (index + 1) * GOLDEN_GAMMA)


def derive_seed(round_seed: int, client_id: int) -> int:
    """A client's seed for one round, derived from the round seed and the client id."""
    return hash64(round_seed, Purpose.CLIENT, client_id)


def _signed(v: int) -> int:
    """Reinterpret an unsigned 64-bit value as int64."""
    return v - (1 << 64) if v >= (1 << 63) else v


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 tensor bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash64_torch(
    seed: int, purpose: int, start: int, n: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """hash64(seed, purpose, i) for i in [start, start + n) as int64 tensor bits (on the
    CPU by the numba kernel: one pass instead of a dozen int64 temporaries; the same
    bits, integer arithmetic being exact)."""
    key = stream_key(seed, purpose)
    if _numba_range(n, device, start):
        out = np.empty(n, dtype=np.uint64)
        _hash_range(np.uint64(key), np.uint64(start), out)
        return torch.from_numpy(out.view(np.int64))
    idx = torch.arange(start + 1, start + n + 1, dtype=torch.int64, device=device)
    z = idx * _signed(GOLDEN_GAMMA) + _signed(key)
    z = (z ^ _srl(z, 30)) * _signed(_MIX1)
    z = (z ^ _srl(z, 27)) * _signed(_MIX2)
    return z ^ _srl(z, 31)


def hash64_numpy(seed: int, purpose: int, start: int, n: int) -> np.ndarray:
    """hash64(seed, purpose, i) for i in [start, start + n) as uint64."""
    key = np.uint64(stream_key(seed, purpose))
    with np.errstate(over="ignore"):
        z = np.arange(start + 1, start + n + 1, dtype=np.uint64) * np.uint64(GOLDEN_GAMMA) + key
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


# ---- numba (inlined into the CPU kernels; uint64 arithmetic wraps mod 2^64) ----------------
_GAMMA_U64, _MIX1_U64, _MIX2_U64 = np.uint64(GOLDEN_GAMMA), np.uint64(_MIX1), np.uint64(_MIX2)
_S27, _S30, _S31, _S63 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(63)
_S40, _UNIT24 = np.uint64(40), np.float32(2.0**-24)
_S11, _UNIT53 = np.uint64(11), 2.0**-53


@njit(cache=True, inline="always")
def counter_numba(key: np.uint64, index: np.uint64) -> np.uint64:  # pragma: no cover - jit
    """The SplitMix64 state of counter `index` in the stream `key`: key + (index + 1) * gamma.
    Consecutive indices differ by gamma, so a kernel walks a stream by ``z += GAMMA_U64``."""
    return np.uint64(key) + (np.uint64(index) + np.uint64(1)) * _GAMMA_U64


@njit(cache=True, inline="always")
def fmix64_numba(z: np.uint64) -> np.uint64:  # pragma: no cover - jit
    """:func:`fmix64` in numba uint64 arithmetic."""
    z = np.uint64(z)  # an int64 argument would shift arithmetically
    z = (z ^ (z >> _S30)) * _MIX1_U64
    z = (z ^ (z >> _S27)) * _MIX2_U64
    return z ^ (z >> _S31)


@njit(cache=True, inline="always")
def hash64_numba(key: np.uint64, index: np.uint64) -> np.uint64:  # pragma: no cover - jit
    """hash64(seed, purpose, index) given the stream key of (seed, purpose)."""
    return fmix64_numba(counter_numba(key, index))


@njit(cache=True, inline="always")
def sign_numba(z: np.uint64) -> np.float32:  # pragma: no cover - jit
    """+1/-1 (float32) from the top bit of fmix64(z) (the final xor-shift keeps it)."""
    z = np.uint64(z)  # an int64 argument would shift arithmetically
    z = (z ^ (z >> _S30)) * _MIX1_U64
    z = (z ^ (z >> _S27)) * _MIX2_U64
    # through int64: a uint64 -> float conversion is a slow branchy sequence
    return np.float32(1.0) - np.float32(2.0) * np.float32(np.int64(z >> _S63))


@njit(cache=True, inline="always")
def uniform_numba(key: np.uint64, index: np.uint64) -> np.float32:  # pragma: no cover - jit
    """:func:`uniforms`' value at `index` of the stream `key`: the top 24 bits of the hash
    times 2^-24, as float32 (for kernels that use each uniform where they make it)."""
    return np.float32(np.int64(hash64_numba(key, index) >> _S40)) * _UNIT24


@njit(cache=True, inline="always")
def uniform64_numba(key: np.uint64, index: np.uint64) -> np.float64:  # pragma: no cover - jit
    """:func:`uniforms64`' value at `index` of the stream `key`: the top 53 bits of the
    hash times 2^-53 (exact in float64)."""
    return np.float64(np.int64(hash64_numba(key, index) >> _S11)) * _UNIT53


GAMMA_U64 = _GAMMA_U64


@njit(cache=True, nogil=True)
def _hash_range(key: np.uint64, start: np.uint64, out: np.ndarray) -> None:  # pragma: no cover
    """out[i] = hash64 of counter start + i in the stream `key` (vectorizes)."""
    for i in range(out.size):
        out[i] = hash64_numba(key, start + np.uint64(i))


@njit(cache=True, nogil=True)
def _uniform_range(key, start, shift, unit, out):  # pragma: no cover - jit
    """out[i] = (hash >> shift) * unit: the top bits as an exact float (float32 for 24
    bits, float64 for 53); through int64, as a uint64 -> float conversion is slow."""
    for i in range(out.size):
        out[i] = np.int64(hash64_numba(key, start + np.uint64(i)) >> shift) * unit


def _numba_range(n: int, device: torch.device | str | None, start: int) -> bool:
    """Whether a stream range is made by the numba kernels: on the CPU, counters < 2^63."""
    return buffers.on_cpu(device) and AVAILABLE and n >= 0 and 0 <= start and start + n < 2**63


def _uniforms(seed: int, purpose: int, n: int, device, start: int, bits: int,
              dtype: torch.dtype) -> torch.Tensor:
    """The top `bits` bits of each hash times 2^-bits, as `dtype` (exact in it)."""
    if _numba_range(n, device, start):  # one pass instead of five torch ones (7x at 2^20)
        out = np.empty(n, dtype=np.float32 if dtype == torch.float32 else np.float64)
        _uniform_range(np.uint64(stream_key(seed, purpose)), np.uint64(start),
                       np.uint64(64 - bits), 2.0**-bits, out)
        return torch.from_numpy(out)
    top = _srl(hash64_torch(seed, purpose, start, n, device), 64 - bits)
    return top.to(dtype) * (2.0**-bits)


def signs(
    seed: int, purpose: int, n: int, device: torch.device | str | None = None, start: int = 0
) -> torch.Tensor:
    """Rademacher signs (+1/-1, float32): the top bit of each hash."""
    top = _srl(hash64_torch(seed, purpose, start, n, device), 63)
    return (1 - 2 * top).to(torch.float32)


def uniforms(
    seed: int, purpose: int, n: int, device: torch.device | str | None = None, start: int = 0
) -> torch.Tensor:
    """Uniforms in [0, 1) as float32, exact multiples of 2^-24 (the top 24 bits)."""
    return _uniforms(seed, purpose, n, device, start, 24, torch.float32)


def uniforms64(
    seed: int, purpose: int, n: int, device: torch.device | str | None = None, start: int = 0
) -> torch.Tensor:
    """Uniforms in [0, 1) as float64, exact multiples of 2^-53 (the top 53 bits)."""
    return _uniforms(seed, purpose, n, device, start, 53, torch.float64)


def integers(
    seed: int,
    purpose: int,
    n: int,
    high: int,
    device: torch.device | str | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Integers in [0, high) (int64), by the top 32 bits times high (high <= 2^31)."""
    if not 0 < high <= 2**31:
        raise ValueError(f"high must be in [1, 2^31], got {high}")
    top32 = _srl(hash64_torch(seed, purpose, start, n, device), 32)
    return (top32 * high) >> 32


def normals(
    seed: int, purpose: int, n: int, device: torch.device | str | None = None, start: int = 0
) -> torch.Tensor:
    """Standard normals (float32) by Box-Muller on two uniform streams.

    Bit-identical across devices up to the platform's float32 ``log``/``cos`` rounding;
    codecs that need exact agreement between sender and receiver use them only where
    a last-ulp difference cannot change a decoded value (sketch matrices).
    """
    u1 = uniforms64(seed, purpose, n, device, start)
    u2 = uniforms64(seed, purpose + 1000, n, device, start)
    r = torch.sqrt(-2.0 * torch.log1p(-u1))
    return (r * torch.cos(2 * torch.pi * u2)).to(torch.float32)


def random_subset(
    seed: int, purpose: int, n: int, k: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """k distinct indices of [0, n), sorted: the k smallest hashes (shared-seed subset)."""
    if not 0 <= k <= n:
        raise ValueError(f"subset size k must be in [0, {n}], got {k}")
    if 0 < k < n and _numba_range(n, device, 0):
        picked = _subset_numba(seed, purpose, n, k)
        if picked is not None:
            return torch.from_numpy(picked)
    return _subset_torch(seed, purpose, n, k, device)


def _subset_torch(seed: int, purpose: int, n: int, k: int,
                  device: torch.device | str | None) -> torch.Tensor:
    """The definition: the indices of the k smallest 63-bit hashes, in ascending order."""
    h = _srl(hash64_torch(seed, purpose, 0, n, device), 1)  # 63-bit, non-negative
    return torch.sort(torch.topk(h, k, largest=False).indices).values


@njit(cache=True, nogil=True)
def _below(key, n, limit, idx, val):  # pragma: no cover - jit
    """The indices i (ascending) whose 63-bit hash is below `limit`, and those hashes;
    -1 if there are more than the buffers hold."""
    count = 0
    for i in range(n):
        h = hash64_numba(key, np.uint64(i)) >> np.uint64(1)
        if h < limit:
            if count == idx.size:
                return -1
            idx[count] = i
            val[count] = h
            count += 1
    return count


def _subset_numba(seed: int, purpose: int, n: int, k: int) -> np.ndarray | None:
    """:func:`_subset_torch`'s indices in O(n) without sorting n hashes: the hashes are
    uniform, so the k smallest lie below (k + 8 sqrt(k) + 64) / n of the range but for a
    chance of about 1e-15; one pass keeps those candidates (in index order) and a
    partition of them finds the k-th smallest. None (use the definition) if the pass kept
    fewer than k, more than its buffers hold, or the k-th hash is tied."""
    margin = 8.0 * math.sqrt(k) + 64.0
    expect = min(float(n), k + margin)
    limit = np.uint64(min(2**63, int(expect / n * 2.0**63)))
    capacity = min(n, int(expect + 8.0 * math.sqrt(expect) + 64))
    idx, val = np.empty(capacity, np.int64), np.empty(capacity, np.uint64)
    count = _below(np.uint64(stream_key(seed, purpose)), n, limit, idx, val)
    if count < k:
        return None
    val = val[:count]
    kth = np.partition(val, k - 1)[k - 1]
    keep = val <= kth
    if int(np.count_nonzero(keep)) != k:  # a tie at the k-th hash: torch.topk decides
        return None
    return idx[:count][keep]
