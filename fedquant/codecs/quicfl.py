"""QUIC-FL: bounded-support stochastic quantization with shared randomness.

the RHT paper ("Quantizing With Randomized Hadamard Transforms: Efficient Heuristic Now
Proven", 2026) section 5 (and Ben-Basat et al., "Accelerating federated learning with quick
distributed mean estimation", ICML 2024). The client rotates x with composed RHTs (two by
default: the RHT paper Theorem 4 makes the outlier fraction match the Gaussian p), and scales
each power-of-two slice to t = z * sqrt(n) / ||x||, near N(0, 1). Then:

* bounded support: coordinates with |t| > T_p, where 2 (1 - Phi(T_p)) = p (T = 3.0973 for
  the default p = 2^-9), are sent exactly, as (position, float32 rotated value); positions
  go as varint-coded sorted gaps or as a bitmap, whichever is shorter for this message
  (sum t^2 = n caps the outliers at n / T^2, about 10%, so in practice gaps win: about
  2 bytes per outlier at p = 2^-9, 0.1 bit per coordinate with the float32 values);
* the rest are stochastically quantized to one of 2^b messages X with a private index h of
  l bits per coordinate, which the receiver regenerates from the client's seed: t is first
  rounded stochastically to a fine grid, then X is drawn from the solved sender table
  P(X | grid point, h). The receiver outputs R[X, h] * ||x|| / sqrt(n). The tables
  minimize the variance for t ~ N(0, 1) on [-T, T] subject to unbiasedness averaged over
  h; see ``fedquant/data/make_quicfl_tables.py`` for the exact LP sender and the
  optimization over R (``quicfl_tables.npz``).

All clients of a round share one rotation (codec parameter ``round_seed``, or
``encode(..., round_seed=)``) while h and the rounding stay private to each client (keyed
by the client seed), so ``decode_sum`` adds the clients' values in the rotated domain and
inverts the rotation once: cost n * d + d log d instead of n * d log d.

Example::

    codec = fq.get_codec("quic-fl", bits=2, round_seed=round_seed)
    enc = codec.encode(grad, seed=fq.random.derive_seed(round_seed, client_id))
"""

from __future__ import annotations

import functools
import math
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedquant import buffers
from fedquant import random as fqr
from fedquant._numba import AVAILABLE, njit
from fedquant.codecs.base import expect_scales, expect_section, register_codec
from fedquant.codecs.positions import PositionCode
from fedquant.codecs.rotated import RotatedCodec, slice_norm, slice_values
from fedquant.packing import _pack_bytes, _pack_numba, packed_len, unpack
from fedquant.rotation import padded_size, slice_layout, unrotate
from fedquant.wire import Encoded, Section, WireError

_TABLES = pathlib.Path(__file__).resolve().parents[1] / "data" / "quicfl_tables.npz"
DEFAULT_SHARED_BITS = {1: 6, 2: 5, 3: 4, 4: 4}
SHIPPED_P = (2.0**-9,)
SECTIONS = ("q", "outlier_values", "outlier_gaps", "outlier_bitmap")


@dataclass(frozen=True)
class QuicTables:
    """Solved tables for one (b, l, p): receiver R (2^b x 2^l, columns ascending), sender
    lo / up (grid points x 2^l: send lo, or lo + 1 with probability up) on a uniform grid
    of [-T, T], and the design vNMSE."""

    receiver: torch.Tensor
    lo: torch.Tensor
    up: torch.Tensor
    grid: torch.Tensor
    threshold: float
    vnmse: float

    @property
    def shared_levels(self) -> int:
        return self.receiver.shape[1]

    def to(self, device: torch.device | str | None) -> QuicTables:
        return QuicTables(self.receiver.to(device), self.lo.to(device), self.up.to(device),
                          self.grid.to(device), self.threshold, self.vnmse)

    def grid_cell(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(i, frac): t = a_i + frac * (a_{i+1} - a_i), for t in [-T, T] (float64)."""
        a0, delta = float(self.grid[0]), float(self.grid[1] - self.grid[0])
        pos = (t - a0) / delta
        i = pos.floor().clamp_(0, self.grid.numel() - 2)
        return i.to(torch.int64), (pos - i).clamp_(0.0, 1.0)

    def sample(self, t: torch.Tensor, h: torch.Tensor, u_grid: torch.Tensor,
               u_msg: torch.Tensor) -> torch.Tensor:
        """Messages X for scaled coordinates t in [-T, T], indices h and private uniforms:
        round t to a grid point j (up with probability frac), then X = lo[j, h] + 1 with
        probability up[j, h]."""
        i, frac = self.grid_cell(t)
        j = i + (u_grid < frac)
        cell = j * self.shared_levels + h
        return self.lo.reshape(-1)[cell] + (u_msg < self.up.reshape(-1)[cell])

    def expected_value(self, t: torch.Tensor) -> torch.Tensor:
        """E_h E_X R[X, h] for each t under :meth:`sample`'s rule (exact, no sampling)."""
        cols = torch.arange(self.shared_levels, device=self.lo.device)
        top = self.receiver.shape[0] - 1
        r_lo = self.receiver[self.lo, cols]
        r_hi = self.receiver[(self.lo + 1).clamp(max=top), cols]
        at_grid = ((1 - self.up) * r_lo + self.up * r_hi).mean(dim=1)
        i, frac = self.grid_cell(t)
        return (1 - frac) * at_grid[i] + frac * at_grid[i + 1]


@functools.cache
def quic_tables(bits: int, shared_bits: int) -> QuicTables:
    """The shipped tables for b bits and l shared bits (p = 2^-9), on the CPU."""
    data = np.load(_TABLES)
    key = f"b{bits}_l{shared_bits}"
    if f"{key}_receiver" not in data:
        raise ValueError(f"no QUIC-FL table for bits={bits}, shared_bits={shared_bits}")
    return QuicTables(
        receiver=torch.from_numpy(data[f"{key}_receiver"]),
        lo=torch.from_numpy(data[f"{key}_lo"].astype(np.int64)),
        up=torch.from_numpy(data[f"{key}_up"]),
        grid=torch.from_numpy(data[f"{key}_grid"]),
        threshold=float(data["threshold"]),
        vnmse=float(data[f"{key}_vnmse"]),
    )


# ---- outlier positions: varint-coded sorted gaps, or a bitmap (codecs/positions.py) -------
OUTLIER_POSITIONS = PositionCode("varint", bitmap="outlier_bitmap", gaps=("outlier_gaps",),
                                 bitmap_on_tie=False, what="the outlier value count")


def outlier_positions(enc: Encoded, n: int, count: int) -> torch.Tensor:
    """Validated outlier positions (int64, sorted, unique, in [0, n)) of an encoding."""
    return OUTLIER_POSITIONS.decode(enc, n, count)


# ---- CPU kernels (numba): sender and receiver in one pass each ----------------------------
_hash = fqr.hash64_numba  # hash64(seed, purpose, i) given the stream key of (seed, purpose)


GATHER_LANES = 8  # table entries looked up per call of _gather8


def _gather_py(table, idx, out, i):  # pragma: no cover - compiled inline by numba
    """out[i:i+8] = table[idx[i:i+8]], as scalar loads (an explicit vector-gather
    intrinsic was 4-7% faster here but ties the code to one LLVM version's intrinsic
    names)."""
    for k in range(GATHER_LANES):
        out[i + k] = table[idx[i + k]]


_gather8 = njit(inline="always")(_gather_py) if AVAILABLE else _gather_py


SAMPLE_CHUNK = 128  # the sender's coordinates per chunk: its buffers stay in L1


def _sample_py(z, offsets, sizes, scales, threshold, a0, delta, m, shared_bits, key_h,
               key_private, table, messages, positions):  # pragma: no cover - numba-compiled
    """QuicFL.sample_messages for all slices in one pass over z, chunk by chunk (the
    chunk's buffers stay in L1; no array of z's length but the outputs):

    1. gather-free, so that it vectorizes: every coordinate's outlier flag, table cell
       (grid point, h) and message coin, outliers too. The same float64 operations in the
       same order as the torch path; h is the top l bits of the SHARED_INDEX hash, the
       two private uniforms the high and low 32 bits of the PRIVATE hash (hash index =
       position in z). The coin is kept as its 32 bits (uniform = coin * 2^-32);
    2. the table lookups (:func:`_gather8`), then the messages written at
       the chunk's place in `messages`:
       table[cell] = lo + 16 * ceil(up * 2^32), so X = lo + (coin < ceil(up * 2^32)),
       which is exactly lo + (coin * 2^-32 < up) (both scalings by 2^32 are exact);
    3. only for a chunk with outliers (most chunks have none): compact its messages in
       place and record the outliers' positions.

    `messages` needs room for z.size values, `positions` for every outlier (ValueError if
    it has not: then the scales were not the slice norms). Returns
    (number of messages, number of outliers)."""
    n_h = 1 << shared_bits
    drop = np.uint64(63 - shared_bits)  # h = (hash >> 1) >> drop: no shift by 64 at l = 0
    low32 = np.uint64(0xFFFFFFFF)
    top = np.float64(m - 2)
    cells = np.empty(SAMPLE_CHUNK, dtype=np.int32)
    coins = np.empty(SAMPLE_CHUNK, dtype=np.int64)
    flags = np.empty(SAMPLE_CHUNK, dtype=np.uint8)
    entries = np.empty(SAMPLE_CHUNK, dtype=np.int64)
    j = 0
    o = 0
    for s in range(offsets.size):
        scale = scales[s]
        end = offsets[s] + sizes[s]
        for c0 in range(offsets[s], end, SAMPLE_CHUNK):
            width = min(SAMPLE_CHUNK, end - c0)
            zc = z[c0:c0 + width]
            count = 0
            for i in range(width):
                t = np.float64(zc[i]) / scale
                out = abs(t) > threshold
                flags[i] = out
                count += out
                index = np.uint64(c0 + i)
                h = np.int64((_hash(key_h, index) >> np.uint64(1)) >> drop)
                bits = _hash(key_private, index)
                # through int64: a uint64 -> float64 conversion is a slow branchy sequence
                u_grid = np.float64(np.int64(bits >> np.uint64(32))) * 2.0**-32
                coins[i] = np.int64(bits & low32)
                pos = (t - a0) / delta
                # clamps as selects (numba's min/max branch on NaN, which blocks SIMD)
                cell = np.floor(pos)
                cell = 0.0 if cell < 0.0 else cell
                cell = top if cell > top else cell
                frac = pos - cell
                frac = 0.0 if frac < 0.0 else frac
                frac = 1.0 if frac > 1.0 else frac
                cells[i] = np.int32((np.int64(cell) + (1 if u_grid < frac else 0)) * n_h + h)
            whole = width - width % GATHER_LANES
            for i in range(0, whole, GATHER_LANES):
                _gather8(table, cells, entries, i)
            for i in range(whole, width):
                entries[i] = table[cells[i]]
            dst = messages[j:j + width]
            for i in range(width):
                e = entries[i]
                dst[i] = np.uint8((e & 15) + (coins[i] < (e >> 4)))
            if count == 0:
                j += width
                continue
            k = j  # k <= j + i: the forward in-place compaction reads before it writes
            for i in range(width):
                if flags[i]:
                    if o == positions.size:
                        raise ValueError("QUIC-FL: more outliers than sum(t^2) = n allows")
                    positions[o] = c0 + i
                    o += 1
                else:
                    messages[k] = dst[i]
                    k += 1
            j = k
    return j, o


_sample_numba = njit(cache=True, nogil=True)(_sample_py) if AVAILABLE else None


@functools.cache
def _sender_table(bits: int, shared_bits: int) -> np.ndarray:
    """The sender table of :func:`_sample_py`: int64 lo + 16 * ceil(up * 2^32) per cell
    (up * 2^32 < 2^53 is exact, so is its ceil); read-only."""
    tables = quic_tables(bits, shared_bits)
    lo = tables.lo.numpy().reshape(-1)
    up = tables.up.numpy().reshape(-1)
    if lo.min() < 0 or lo.max() > 15 or up.min() < 0 or up.max() > 1:
        raise ValueError("QUIC-FL sender table: lo must be in 0..15 and up in [0, 1]")
    table = lo.astype(np.int64) | (np.ceil(up * 2.0**32).astype(np.int64) << 4)
    table.flags.writeable = False  # cached: shared by every encode
    return table


@functools.lru_cache(maxsize=64)
def _slice_arrays(d: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, sizes) of slice_layout(d) as int64 arrays (cached, read-only)."""
    layout = slice_layout(d)
    offsets = np.array([s.offset for s in layout], dtype=np.int64)
    sizes = np.array([s.size for s in layout], dtype=np.int64)
    offsets.flags.writeable = sizes.flags.writeable = False
    return offsets, sizes


def _pack_messages(buf: np.ndarray, count: int, bits: int) -> bytes:
    """fedquant.packing.pack of buf[:count] (uint8, b-bit messages); `buf` has 7 spare
    bytes after them, zeroed here, so that b = 1, 2, 4 take the whole-byte kernel."""
    whole = -(-count // 8) * 8
    buf[count:whole] = 0  # zero padding: the last byte's unused high bits stay zero
    out = np.empty(packed_len(whole, bits), dtype=np.uint8)
    if bits in (1, 2, 4):
        ok = _pack_bytes(buf[:whole], bits, out)
    else:
        ok = _pack_numba(buf[:whole], bits, out)
    if not ok:
        raise ValueError(f"QUIC-FL message out of range for {bits} bits")
    return out[:packed_len(count, bits)].tobytes()


def _accumulate_py(out, messages, outlier_pos, outlier_vals, offsets, sizes, scales,
                   receiver, key, shared_bits, weight):  # pragma: no cover - numba-compiled
    """out += weight * (this client's rotated-domain estimate), in one pass.

    h for coordinate i is fedquant.random.integers(seed, SHARED_INDEX, n, 2^l)[i], hashed
    here inline: with 2^l levels, (top32 * 2^l) >> 32 is the hash's top l bits.
    """
    j = 0
    o = 0
    k = outlier_pos.size
    drop = np.uint64(63 - shared_bits)  # h = (hash >> 1) >> drop: no shift by 64 at l = 0
    n_h = receiver.shape[1]
    table = receiver.ravel()
    cells = np.empty(CELL_CHUNK, dtype=np.int32)
    for s in range(offsets.size):
        scale = scales[s] * weight
        i = offsets[s]
        end = i + sizes[s]
        while i < end:
            stop = outlier_pos[o] if o < k and outlier_pos[o] < end else end
            stop = min(stop, i + CELL_CHUNK)
            run = stop - i  # inliers i .. stop - 1, with no outlier among them
            dst, msg = out[i:stop], messages[j:j + run]
            # the table cells (message, h) first: hashing without gathers vectorizes
            for t in range(run):
                h = np.int64((_hash(key, np.uint64(i + t)) >> np.uint64(1)) >> drop)
                cells[t] = np.int32(np.int64(msg[t]) * n_h + h)
            for t in range(run):
                dst[t] += scale * table[cells[t]]
            j += run
            i = stop
            if i < end and o < k and outlier_pos[o] == i:  # the outlier at i (or a chunk end)
                out[i] += weight * outlier_vals[o]
                o += 1
                i += 1


_accumulate_numba = njit(cache=True, nogil=True)(_accumulate_py) if AVAILABLE else None
CELL_CHUNK = 1 << 12  # table cells computed ahead in runs of at most this many


def _private_uniforms(seed: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent uniforms per coordinate (multiples of 2^-32, float64) from one
    64-bit hash each: its high and low halves. Sender-only randomness."""
    bits = fqr.hash64_torch(seed, fqr.Purpose.PRIVATE, 0, n, device)
    low32 = (1 << 32) - 1
    high = (bits >> 32) & low32
    return high.to(torch.float64) * 2.0**-32, (bits & low32).to(torch.float64) * 2.0**-32


@register_codec
class QuicFL(RotatedCodec):
    """QUIC-FL (the RHT paper section 5): bounded support + shared-randomness quantization.

    Args:
        bits (int, default 2): message bits per coordinate, 1..4.
        shared_bits (int, default -1): bits l of the private index h; -1 = 6/5/4/4 for
            b = 1..4; 0 = no shared randomness (plain unbiased stochastic quantization).
        p (float, default 2^-9): bounded-support tail mass (T = 3.0973); tables ship for 2^-9.
        rotations (int | str, default "2"): composed RHTs, 0..3 or "auto" (scalar check).
        round_seed (int, default -1): seed of the rotation shared by a round's clients;
            -1 rotates with each client's own seed (no rotated-domain sum then).
    """

    name = "quic-fl"
    unbiased = True

    def __init__(self, bits: int = 2, shared_bits: int = -1, p: float = 2.0**-9,
                 rotations: str = "2", round_seed: int = -1):
        if not isinstance(bits, int) or bits not in DEFAULT_SHARED_BITS:
            raise ValueError(f"bits must be 1, 2, 3 or 4, got {bits!r}")
        if shared_bits == -1:
            shared_bits = DEFAULT_SHARED_BITS[bits]
        if not isinstance(shared_bits, int) or not 0 <= shared_bits <= DEFAULT_SHARED_BITS[bits]:
            raise ValueError(f"shared_bits must be -1 or an integer in "
                             f"0..{DEFAULT_SHARED_BITS[bits]} for bits={bits}, got {shared_bits!r}")
        if not any(math.isclose(float(p), q, rel_tol=1e-12) for q in SHIPPED_P):
            raise ValueError(f"p must be one of {list(SHIPPED_P)} (tables are shipped for "
                             f"these), got {p!r}")
        if not isinstance(round_seed, int) or not -1 <= round_seed < 2**64:
            raise ValueError(f"round_seed must be -1 or an int in [0, 2^64), got {round_seed!r}")
        self.set_rotations(rotations)
        self.bits, self.shared_bits, self.p = bits, shared_bits, float(p)
        self.round_seed = round_seed

    @property
    def tables(self) -> QuicTables:
        return quic_tables(self.bits, self.shared_bits)

    def rotation_seed(self, client_seed: int) -> int:
        return client_seed if self.round_seed < 0 else self.round_seed

    # ---- encode ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, seed: int = 0, round_seed: int | None = None) -> Encoded:
        """Encode x with the client seed `seed`; `round_seed` overrides the parameter."""
        if round_seed is not None and round_seed != self.round_seed:
            return QuicFL(**{**self.params(), "round_seed": round_seed}).encode(x, seed)
        return super().encode(x, seed)

    def quantize(self, z: torch.Tensor, d: int, seed: int,
                 rotations: int) -> tuple[list[float], dict[str, Section]]:
        scales = [slice_norm(z[s.offset: s.offset + s.size]) / math.sqrt(s.size)
                  for s in slice_layout(d)]
        if z.device.type == "cpu" and _sample_numba is not None:
            buf, n_msg, positions = self._sample_cpu(z, scales, seed, d)
            q = Section("q", self.bits, n_msg, _pack_messages(buf, n_msg, self.bits))
        else:
            messages, positions = self.sample_messages(z, scales, seed, d)
            q = Section.from_ints("q", messages, self.bits)
        sections = {
            "q": q,
            "outlier_values": Section.from_raw("outlier_values", z[positions].float()),
        }
        sections.update(OUTLIER_POSITIONS.encode(positions, z.numel()))
        return scales, sections

    def sample_messages(self, z: torch.Tensor, scales: Sequence[float], seed: int,
                        d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(messages of the inliers in order, outlier positions) for the rotated z of a
        d-coordinate input with slice scales ||x_slice|| / sqrt(size) (plain torch)."""
        n, device = z.numel(), z.device
        tables = self.tables.to(device)
        scale = slice_values(scales, d, device)
        t = z.to(torch.float64) / scale.clamp(min=1e-300)  # all-zero slice: t = 0
        outlier = t.abs() > tables.threshold
        positions = torch.nonzero(outlier).reshape(-1)
        inlier = ~outlier
        h = fqr.integers(seed, fqr.Purpose.SHARED_INDEX, n, tables.shared_levels, device)
        u_grid, u_msg = _private_uniforms(seed, n, device)
        return tables.sample(t[inlier], h[inlier], u_grid[inlier], u_msg[inlier]), positions

    def _sample_messages_cpu(self, z: torch.Tensor, scales: Sequence[float], seed: int,
                             d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample_messages` in one numba pass (same numbers, bit for bit)."""
        buf, n_msg, positions = self._sample_cpu(z, scales, seed, d)
        return torch.from_numpy(buf[:n_msg]), positions

    def _sample_cpu(self, z: torch.Tensor, scales: Sequence[float], seed: int,
                    d: int) -> tuple[np.ndarray, int, torch.Tensor]:
        """(uint8 buffer whose first n_msg entries are the messages, with at least 7 spare
        entries after them; n_msg; outlier positions) from :func:`_sample_py`."""
        tables = self.tables
        grid = tables.grid.numpy()
        n = z.numel()
        messages = np.empty(n + 8, dtype=np.uint8)  # bits <= 4: a message fits a byte
        # sum t^2 = n over a slice: at most n / T^2 (< n / 9.5) outliers, plus rounding
        positions = np.empty(n // 8 + 16, dtype=np.int64)
        n_msg, n_out = _sample_numba(
            z.numpy(), *_slice_arrays(d),
            np.array([max(scale, 1e-300) for scale in scales], dtype=np.float64),
            tables.threshold, float(grid[0]), float(grid[1] - grid[0]), grid.size,
            self.shared_bits, np.uint64(fqr.stream_key(seed, fqr.Purpose.SHARED_INDEX)),
            np.uint64(fqr.stream_key(seed, fqr.Purpose.PRIVATE)),
            _sender_table(self.bits, self.shared_bits), messages, positions)
        return messages, n_msg, torch.from_numpy(positions[:n_out])

    # ---- wire checks ---------------------------------------------------------------------
    def validate(self, enc: Encoded) -> None:
        super().validate(enc)
        extra = set(enc.sections) - set(SECTIONS)
        if extra:
            raise WireError(f"sections: unexpected {sorted(extra)}; allowed: {list(SECTIONS)}")
        n = padded_size(enc.numel)
        expect_scales(enc, len(slice_layout(enc.numel)))
        if any(s < 0 for s in enc.scales):
            raise WireError("scales: a slice scale (norm / sqrt(size)) is negative")
        values = enc.section("outlier_values")
        if values.bits != 32:
            raise WireError(f"sections['outlier_values'].bits: expected 32, got {values.bits}")
        if values.count > n:
            raise WireError(f"sections['outlier_values'].count: {values.count} exceeds the "
                            f"rotated length {n}")
        if not bool(torch.isfinite(values.raw("float")).all()):
            raise WireError("sections['outlier_values']: NaN or Inf value")
        outlier_positions(enc, n, values.count)
        expect_section(enc, "q", n - values.count, self.bits)

    def stats(self, enc: Encoded) -> dict[str, float]:
        n = padded_size(enc.numel)
        return {"outlier_fraction": enc.section("outlier_values").count / max(n, 1)}

    # ---- decode ------------------------------------------------------------------------
    def accumulate(self, out: torch.Tensor, enc: Encoded, weight: float = 1.0) -> None:
        """out += weight * the client's estimate in the rotated domain (before the inverse
        RHTs); out is float64 of the padded length, on the decoding device."""
        self.validate(enc)  # the kernel trusts counts and bits: check even unparsed encodings
        n = padded_size(enc.numel)
        if out.shape != (n,) or out.dtype != torch.float64:
            raise ValueError(f"out must be float64 of shape ({n},), got {out.dtype} "
                             f"{tuple(out.shape)}")
        if out.device.type == "cpu" and _accumulate_numba is not None:
            self._accumulate_cpu(out.numpy(), enc, weight)
            return
        out.add_(self.decode_rotated(enc, out.device), alpha=weight)

    def _accumulate_cpu(self, out: np.ndarray, enc: Encoded, weight: float) -> None:
        """The numba receiver on a validated encoding: out += weight * estimate, each term
        computed in float64 (into a float32 `out` that starts at zero, that is the float64
        estimate rounded once, as ``.to(torch.float32)`` would)."""
        n = padded_size(enc.numel)
        values = enc.section("outlier_values").raw("float").to(torch.float64)
        positions = outlier_positions(enc, n, values.numel())
        layout = slice_layout(enc.numel)
        _accumulate_numba(
            out, _messages(enc), positions.numpy(), values.numpy(),
            np.array([s.offset for s in layout], dtype=np.int64),
            np.array([s.size for s in layout], dtype=np.int64),
            np.array(enc.scales, dtype=np.float64), self.tables.receiver.numpy(),
            np.uint64(fqr.stream_key(enc.seed, fqr.Purpose.SHARED_INDEX)),
            self.shared_bits, float(weight))

    def decode_rotated(self, enc: Encoded, device=None) -> torch.Tensor:
        """The client's estimate in the rotated domain, float64 (plain torch, any device)."""
        n = padded_size(enc.numel)
        tables = self.tables.to(device)
        values = enc.section("outlier_values").raw("float", device).to(torch.float64)
        positions = outlier_positions(enc, n, values.numel()).to(device)
        inlier = torch.ones(n, dtype=torch.bool, device=device)
        inlier[positions] = False
        h = fqr.integers(enc.seed, fqr.Purpose.SHARED_INDEX, n, tables.shared_levels,
                         device)[inlier]
        messages = enc.section("q").ints(device)
        out = torch.zeros(n, dtype=torch.float64, device=device)
        scale = slice_values(enc.scales, enc.numel, device)
        out[inlier] = tables.receiver[messages, h] * scale[inlier]
        out[positions] = values
        return out

    def decode(self, enc: Encoded, device=None) -> torch.Tensor:
        if buffers.on_cpu(device) and _accumulate_numba is not None:
            self.validate(enc)  # the kernel trusts counts and bits
            # float32 straight from the kernel, zeros from calloc (lazily zeroed pages)
            z = np.zeros(padded_size(enc.numel), dtype=np.float32)
            self._accumulate_cpu(z, enc, 1.0)
            return self.unrotate(torch.from_numpy(z), enc, inplace=True)
        z = torch.zeros(padded_size(enc.numel), dtype=torch.float64, device=device)
        self.accumulate(z, enc)
        return self.unrotate(z.to(torch.float32), enc, inplace=True)

    def decode_sum(self, encs: Sequence[Encoded], weights: Sequence[float],
                   device=None) -> torch.Tensor:
        """sum_i w_i decode(enc_i): one inverse rotation when all share the rotation."""
        from fedquant.mean import decoded_sum, split_sum  # (mean imports the codecs)

        encs = list(encs)
        rotation_keys = {(codec_rotation_seed(e), e.rotations) for e in encs}
        if len(rotation_keys) != 1:  # per-client rotations: per-client decodes, threaded
            return decoded_sum(self, encs, weights, device).to(torch.float32)
        n = padded_size(encs[0].numel)

        def share(part: list[Encoded], part_weights: list[float]) -> torch.Tensor:
            total = torch.zeros(n, dtype=torch.float64, device=device)
            for enc, w in zip(part, part_weights, strict=True):
                self.accumulate(total, enc, w)  # the numba receiver releases the GIL
            return total

        total = split_sum(share, encs, weights, device)
        (rot_seed, k), = rotation_keys
        return unrotate(total.to(torch.float32), rot_seed, k, encs[0].numel)


def _messages(enc: Encoded) -> np.ndarray:
    """Section "q" unpacked as uint8 (b <= 4: an eighth of int64's memory traffic)."""
    q = enc.section("q")
    return unpack(q.data, q.bits, q.count, dtype=torch.uint8).numpy()


def codec_rotation_seed(enc: Encoded) -> int:
    """The seed of the RHTs an encoding was rotated with (its round seed, else its seed)."""
    round_seed = int(enc.params.get("round_seed", "-1"))
    return enc.seed if round_seed < 0 else round_seed


__all__ = ["QuicFL", "QuicTables", "quic_tables", "codec_rotation_seed"]
