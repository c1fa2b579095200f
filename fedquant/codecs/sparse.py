"""Sparsification baselines: top-k (largest magnitudes) and rand-k (shared-seed subset).

* ``topk``: Aji & Heafield, "Sparse Communication for Distributed Gradient Descent" (EMNLP
  2017); Stich et al., "Sparsified SGD with Memory" (NeurIPS 2018). The k coordinates of
  largest magnitude are sent exactly (float32, or float16); biased. Among equal
  magnitudes at the cut the lowest positions win (on the CPU kernel; torch.topk's choice
  on other devices). Their sorted positions
  travel compactly, as whichever is smaller: a d-bit bitmap, or the gaps between positions
  in a Rice code (r low bits of each gap in one bit section, the rest in unary in another,
  so both encode and decode are vectorized).
* ``randk``: Stich et al. (2018); Konecny & Richtarik, "Randomized Distributed Mean
  Estimation" (2018). k coordinates drawn from the shared seed
  (``fedquant.random.random_subset``, nothing sent for them), rescaled by d / k so the
  estimate is unbiased (exactly with float32 values; float16 adds rounding).

k is ``count`` when it is positive, else round(fraction * d) (at least 1).

Example::

    enc = fq.get_codec("topk", fraction=0.01).encode(grad)
"""

from __future__ import annotations

import numpy as np
import torch

from fedquant import cpu_kernels
from fedquant import random as fqr
from fedquant._numba import njit
from fedquant.codecs.base import (
    FLOAT32_MAX,
    Codec,
    check_input,
    check_seed,
    expect_section,
    register_codec,
)
from fedquant.codecs.positions import PositionCode
from fedquant.wire import Encoded, Section

VALUE_FORMATS = {"fp32": torch.float32, "fp16": torch.float16}


def sparse_count(d: int, fraction: float, count: int) -> int:
    """k for a vector of d coordinates (see the module docstring)."""
    if d == 0:
        return 0
    if count > 0:
        return min(count, d)
    return min(d, max(1, round(fraction * d)))


# the kept positions: a bitmap or a Rice code of their gaps (fedquant/codecs/positions.py)
KEPT_POSITIONS = PositionCode("rice", bitmap="bitmap", gaps=("gap_low", "gap_high"),
                              bitmap_on_tie=True)


def encode_positions(positions: torch.Tensor, d: int) -> dict[str, Section]:
    """Sorted distinct positions in [0, d) as a bitmap or a Rice code of their gaps,
    whichever takes fewer bytes."""
    return KEPT_POSITIONS.encode(positions, d)


def decode_positions(enc: Encoded, k: int, device=None) -> torch.Tensor:
    """The k sorted positions; WireError if the sections do not describe k distinct
    positions in [0, numel)."""
    return KEPT_POSITIONS.decode(enc, enc.numel, k, device)


# ---- the k largest magnitudes on the CPU, in O(d) -----------------------------------------
# For finite float32 values the bits of |x| (the sign bit cleared), read as an integer, are
# ordered as |x| is. A histogram of their top 16 bits finds the bin of the k-th largest; its
# members decide the threshold T; one ordered scan keeps every |x| above T and, of those
# equal to T, the lowest indices. (torch.topk leaves the choice among ties open.)
_BIN_SHIFT = 15  # 31 magnitude bits -> 2^16 bins


@njit(cache=True, nogil=True)
def _bin_of_kth(keys, k):  # pragma: no cover - jit
    """(the bin holding the k-th largest key, the count of keys in higher bins, the
    count in that bin)."""
    counts = np.zeros(1 << 16, np.int64)
    for i in range(keys.size):
        counts[keys[i] >> _BIN_SHIFT] += 1
    above = 0
    b = (1 << 16) - 1
    while above + counts[b] < k:
        above += counts[b]
        b -= 1
    return b, above, counts[b]


@njit(cache=True, nogil=True)
def _bin_members(keys, b, count):  # pragma: no cover - jit
    out = np.empty(count, np.int32)
    j = 0
    for i in range(keys.size):
        if keys[i] >> _BIN_SHIFT == b:
            out[j] = keys[i]
            j += 1
    return out


@njit(cache=True, nogil=True)
def _keep(keys, threshold, ties, out):  # pragma: no cover - jit
    """out = the ascending indices with key > threshold, and the first `ties` with key ==
    threshold."""
    j = 0
    for i in range(keys.size):
        key = keys[i]
        if key > threshold or (key == threshold and ties > 0):
            if key == threshold:
                ties -= 1
            out[j] = i
            j += 1


def top_positions(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ascending positions of the k largest |x| of a flat finite tensor (ties: the
    lowest positions on the CPU kernel; torch.topk's choice elsewhere)."""
    n = x.numel()
    if not (cpu_kernels.usable(x) and 0 < k < n):
        return torch.sort(torch.topk(x.abs(), k).indices).values
    keys = x.detach().contiguous().numpy().view(np.int32) & np.int32(0x7FFFFFFF)
    b, above, count = _bin_of_kth(keys, k)
    members = _bin_members(keys, b, count)
    need = k - above  # of the bin's members, the largest `need`
    threshold = np.partition(members, members.size - need)[members.size - need]
    ties = need - int(np.count_nonzero(members > threshold))
    out = np.empty(k, np.int64)
    _keep(keys, threshold, ties, out)
    return torch.from_numpy(out)


class _Sparse(Codec):
    """Shared parameters and the value section of topk and randk."""

    def __init__(self, fraction: float = 0.01, count: int = 0, values: str = "fp32"):
        if not isinstance(fraction, float | int) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a non-negative integer, got {count!r}")
        if values not in VALUE_FORMATS:
            raise ValueError(f"values must be one of {sorted(VALUE_FORMATS)}, got {values!r}")
        self.fraction, self.count, self.values = float(fraction), count, values

    def k_for(self, d: int) -> int:
        return sparse_count(d, self.fraction, self.count)

    def _values_section(self, v: torch.Tensor) -> Section:
        if self.values == "fp16" and v.numel() and float(v.abs().max()) > 65504.0:
            raise ValueError("a kept value exceeds the float16 range; use values='fp32'")
        return Section.from_raw("values", v.to(VALUE_FORMATS[self.values]))

    def _check_values(self, enc: Encoded) -> int:
        k = self.k_for(enc.numel)
        expect_section(enc, "values", k, torch.finfo(VALUE_FORMATS[self.values]).bits)
        return k


@register_codec
class TopK(_Sparse):
    """Top-k sparsification (biased).

    Args:
        fraction (float, default 0.01): share of coordinates kept when count is 0.
        count (int, default 0): number of coordinates kept, if positive.
        values (str, default "fp32"): "fp32" (exact values) or "fp16".
    """

    name = "topk"
    unbiased = False

    def encode(self, x: torch.Tensor, seed: int = 0) -> Encoded:
        flat = check_input(x)
        k = self.k_for(flat.numel())
        positions = top_positions(flat, k)
        sections = encode_positions(positions, flat.numel())
        sections["values"] = self._values_section(flat[positions])
        return self._new_encoded(x, check_seed(seed), sections=sections)

    def validate(self, enc: Encoded) -> None:
        decode_positions(enc, self._check_values(enc))

    def decode(self, enc: Encoded, device=None) -> torch.Tensor:
        positions = decode_positions(enc, self.k_for(enc.numel), device)
        out = torch.zeros(enc.numel, dtype=torch.float32, device=positions.device)
        out[positions] = enc.section("values").raw("float", device).to(torch.float32)
        return out


@register_codec
class RandK(_Sparse):
    """Rand-k sparsification on a shared-seed subset, rescaled by d / k (unbiased).

    Args:
        fraction (float, default 0.01): share of coordinates kept when count is 0.
        count (int, default 0): number of coordinates kept, if positive.
        values (str, default "fp32"): "fp32" or "fp16".
    """

    name = "randk"
    unbiased = True

    def encode(self, x: torch.Tensor, seed: int = 0) -> Encoded:
        flat = check_input(x)
        k = self.k_for(flat.numel())
        positions = fqr.random_subset(check_seed(seed), fqr.Purpose.SUBSET, flat.numel(), k,
                                      device=flat.device)
        kept = flat[positions]
        if k and float(kept.abs().max()) * (flat.numel() / k) > FLOAT32_MAX:
            raise ValueError("randk: the input is too large to encode: a kept value times "
                             f"d / k = {flat.numel() / k:.4g} passes float32's range")
        return self._new_encoded(x, seed, sections={"values": self._values_section(kept)})

    def validate(self, enc: Encoded) -> None:
        self._check_values(enc)

    def decode(self, enc: Encoded, device=None) -> torch.Tensor:
        d, k = enc.numel, self.k_for(enc.numel)
        values = enc.section("values").raw("float", device).to(torch.float64)
        positions = fqr.random_subset(enc.seed, fqr.Purpose.SUBSET, d, k, device=values.device)
        out = torch.zeros(d, dtype=torch.float64, device=values.device)
        out[positions] = values * (d / k) if k else values
        return out.to(torch.float32)
