"""Sorted distinct positions in [0, n) on the wire: the one position coder.

Top-k sends the positions of its kept coordinates, QUIC-FL those of its outliers. Both
send whichever is shorter of an n-bit bitmap and a code of the gaps between consecutive
positions (gap_i = p_i - p_(i-1) - 1, with p_(-1) = -1), with one of two gap codes:

* ``"varint"``: LEB128 bytes, 7 bits a byte, least significant first (QUIC-FL's few and
  spread-out outliers: about 2 bytes each at p = 2^-9);
* ``"rice"``: a Rice code, the r low bits of every gap in one 1-bit section and the rest
  in unary in another, r minimizing the size (top-k's dense positions; encode and decode
  are vectorized torch ops).

Decoding checks that the sections describe exactly `count` sorted distinct positions in
[0, n) and raises WireError naming the section otherwise. Each codec keeps its own section
names and tie rule, so its bytes on the wire are what they always were.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedquant.codecs.base import expect_section
from fedquant.packing import packed_len
from fedquant.wire import Encoded, Section, WireError

GAP_CODES = ("varint", "rice")
MAX_VARINT_BYTES = 5  # 35 bits: every gap of a vector of at most 2^31 * 8 coordinates
MAX_RICE_BITS = 31


def gaps_of(positions: torch.Tensor) -> torch.Tensor:
    """gap_i = p_i - p_(i-1) - 1 with p_(-1) = -1 (int64, on the positions' device)."""
    prev = torch.cat((positions.new_full((1,), -1), positions[:-1]))
    return positions - prev - 1


# ---- varint (LEB128) ------------------------------------------------------------------------
def varint_bytes(values: np.ndarray) -> bytes:
    """LEB128: 7 bits per byte, least significant first, high bit = more bytes follow."""
    values = values.astype(np.uint64)
    nbytes = np.ones(values.size, dtype=np.int64)
    for k in range(1, MAX_VARINT_BYTES):
        nbytes += values >= np.uint64(1 << (7 * k))
    group = np.repeat(np.arange(values.size), nbytes)
    starts = np.cumsum(nbytes) - nbytes
    place = np.arange(group.size) - starts[group]
    out = (values[group] >> (7 * place).astype(np.uint64)) & np.uint64(0x7F)
    more = place < nbytes[group] - 1
    return (out | (more.astype(np.uint64) << np.uint64(7))).astype(np.uint8).tobytes()


def parse_varints(data: bytes, field: str) -> np.ndarray:
    """Inverse of :func:`varint_bytes`; WireError on truncated, overlong or non-canonical
    codes."""
    arr = np.frombuffer(data, dtype=np.uint8)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.flatnonzero(arr < 0x80)
    if ends.size == 0 or ends[-1] != arr.size - 1:
        raise WireError(f"{field}: truncated varint at the end")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > MAX_VARINT_BYTES:
        raise WireError(f"{field}: varint longer than {MAX_VARINT_BYTES} bytes")
    if np.any((lengths > 1) & (arr[ends] == 0)):
        raise WireError(f"{field}: non-canonical varint (trailing zero byte)")
    group = np.repeat(np.arange(ends.size), lengths)
    place = np.arange(arr.size) - starts[group]
    parts = (arr & 0x7F).astype(np.int64) << (7 * place)
    return np.add.reduceat(parts, starts)


# ---- Rice ---------------------------------------------------------------------------------
def rice_bits(gaps: torch.Tensor) -> int:
    """The Rice parameter r that minimizes k*r + sum(gaps >> r) + k."""
    costs = [r * gaps.numel() + int((gaps >> r).sum()) for r in range(MAX_RICE_BITS + 1)]
    return min(range(MAX_RICE_BITS + 1), key=costs.__getitem__)


@dataclass(frozen=True)
class PositionCode:
    """How one codec sends sorted positions (see the module docstring).

    Attributes:
        gap_code: "varint" (one 8-bit section) or "rice" (two 1-bit sections).
        bitmap: the bitmap section's name.
        gaps: the gap sections' names (one for varint: bytes; two for rice: low, high).
        bitmap_on_tie: whether the bitmap is sent when both take the same bytes.
        what: what the count is, for error messages (e.g. "the outlier value count").
    """

    gap_code: str
    bitmap: str
    gaps: tuple[str, ...]
    bitmap_on_tie: bool
    what: str = ""

    def __post_init__(self) -> None:
        if self.gap_code not in GAP_CODES:
            raise ValueError(f"gap_code must be one of {GAP_CODES}, got {self.gap_code!r}")
        if len(self.gaps) != (1 if self.gap_code == "varint" else 2):
            raise ValueError(f"{self.gap_code} needs {1 if self.gap_code == 'varint' else 2} "
                             f"gap section name(s), got {self.gaps}")

    def _expected(self, count: int) -> str:
        return f"expected {count}" + (f" ({self.what})" if self.what else "")

    # ---- encode -------------------------------------------------------------------------
    def encode(self, positions: torch.Tensor, n: int) -> dict[str, Section]:
        """Sorted distinct positions in [0, n) as the shorter of the bitmap and the gaps."""
        gaps = self._gap_sections(positions)
        gap_bytes = sum(len(s.data) for s in gaps.values())
        bitmap_bytes = packed_len(n, 1)
        if bitmap_bytes < gap_bytes or (bitmap_bytes == gap_bytes and self.bitmap_on_tie):
            bitmap = torch.zeros(n, dtype=torch.uint8, device=positions.device)
            bitmap[positions] = 1
            return {self.bitmap: Section.from_ints(self.bitmap, bitmap, 1)}
        return gaps

    def _gap_sections(self, positions: torch.Tensor) -> dict[str, Section]:
        gaps = gaps_of(positions)
        if self.gap_code == "varint":
            data = varint_bytes(gaps.cpu().numpy())
            return {self.gaps[0]: Section(self.gaps[0], 8, len(data), data)}
        k = positions.numel()
        r = rice_bits(gaps) if k else 0
        high = gaps >> r
        low = torch.empty(k, r, dtype=torch.uint8, device=positions.device)
        for j in range(r):
            low[:, j] = (gaps >> j) & 1
        # unary: high[i] ones then a zero that ends gap i
        unary = torch.ones(int(high.sum()) + k, dtype=torch.uint8, device=positions.device)
        unary[torch.cumsum(high + 1, 0) - 1] = 0
        low_name, high_name = self.gaps
        return {low_name: Section.from_ints(low_name, low.reshape(-1), 1),
                high_name: Section.from_ints(high_name, unary, 1)}

    # ---- decode -------------------------------------------------------------------------
    def decode(self, enc: Encoded, n: int, count: int,
               device: torch.device | str | None = None) -> torch.Tensor:
        """The `count` sorted positions (int64); WireError unless the sections describe
        exactly that many distinct positions in [0, n)."""
        has_bitmap = self.bitmap in enc.sections
        has_gaps = any(g in enc.sections for g in self.gaps)
        if has_bitmap == has_gaps:
            names = "', '".join((*self.gaps, self.bitmap))
            raise WireError(f"sections: need exactly one of the bitmap and the gaps of the "
                            f"positions ('{names}'), got {'both' if has_bitmap else 'neither'}")
        if has_bitmap:
            expect_section(enc, self.bitmap, n, 1)
            positions = torch.nonzero(enc.section(self.bitmap).ints(device)).reshape(-1)
            if positions.numel() != count:
                raise WireError(f"sections['{self.bitmap}']: {positions.numel()} bits set, "
                                f"{self._expected(count)}")
            return positions
        if self.gap_code == "varint":
            return self._decode_varint(enc, n, count).to(device)
        return self._decode_rice(enc, n, count, device)

    def _decode_varint(self, enc: Encoded, n: int, count: int) -> torch.Tensor:
        name = self.gaps[0]
        section = enc.section(name)
        if section.bits != 8:
            raise WireError(f"sections['{name}'].bits: expected 8, got {section.bits}")
        gaps = parse_varints(section.data, f"sections['{name}']")
        if gaps.size != count:
            raise WireError(f"sections['{name}']: {gaps.size} gaps, {self._expected(count)}")
        if gaps.size and int(gaps.max()) >= n:
            raise WireError(f"sections['{name}']: gap {int(gaps.max())} exceeds the length {n}")
        positions = np.cumsum(gaps + 1) - 1
        if positions.size and positions[-1] >= n:
            raise WireError(f"sections['{name}']: position {int(positions[-1])} is outside "
                            f"[0, {n})")
        return torch.from_numpy(positions)

    def _decode_rice(self, enc: Encoded, n: int, k: int, device) -> torch.Tensor:
        low_name, high_name = self.gaps
        low_s, high_s = enc.section(low_name), enc.section(high_name)
        if low_s.bits != 1 or high_s.bits != 1:
            raise WireError(f"sections['{low_name}'/'{high_name}'].bits: expected 1")
        r = low_s.count // k if k else 0
        if low_s.count != k * r or r > MAX_RICE_BITS:
            raise WireError(f"sections['{low_name}'].count: {low_s.count} is not k * r for "
                            f"k = {k} and r <= {MAX_RICE_BITS}")
        if high_s.count < k or high_s.count > n + k:
            raise WireError(f"sections['{high_name}'].count: {high_s.count} outside "
                            f"[{k}, {n + k}]")
        if k == 0:
            return torch.zeros(0, dtype=torch.int64, device=device)
        unary = high_s.ints(device)
        ends = torch.nonzero(unary == 0).reshape(-1)
        if ends.numel() != k or int(ends[-1]) != high_s.count - 1:
            raise WireError(f"sections['{high_name}']: expected {k} unary codes ending the "
                            "section")
        high = torch.diff(ends, prepend=ends.new_full((1,), -1)) - 1
        if bool((high > (n >> r)).any()):
            raise WireError(f"sections['{high_name}']: a gap exceeds the vector length")
        weights = torch.pow(2, torch.arange(r, device=unary.device, dtype=torch.int64))
        low = (low_s.ints(device).view(k, r) * weights).sum(1)
        positions = torch.cumsum((high << r) + low + 1, 0) - 1
        if int(positions[-1]) >= n:
            raise WireError(f"sections['{low_name}'/'{high_name}']: position "
                            f"{int(positions[-1])} is outside [0, {n})")
        return positions


__all__ = ["GAP_CODES", "MAX_RICE_BITS", "MAX_VARINT_BYTES", "PositionCode", "gaps_of",
           "parse_varints", "rice_bits", "varint_bytes"]
