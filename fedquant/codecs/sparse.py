"""Sparsification baselines: top-k (largest magnitudes) and rand-k (shared-seed subset).

* ``topk``: Aji & Heafield, "Sparse Communication for Distributed Gradient Descent" (EMNLP
  2017); Stich et al., "Sparsified SGD with Memory" (NeurIPS 2018). The k coordinates of
  largest magnitude are sent exactly (float32, or float16); biased. Their sorted positions
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

import torch

from fedquant import random as fqr
from fedquant.codecs.base import Codec, check_input, check_seed, expect_section, register_codec
from fedquant.packing import packed_len
from fedquant.wire import Encoded, Section, WireError

VALUE_FORMATS = {"fp32": torch.float32, "fp16": torch.float16}
MAX_RICE_BITS = 31


def sparse_count(d: int, fraction: float, count: int) -> int:
    """k for a vector of d coordinates (see the module docstring)."""
    if d == 0:
        return 0
    if count > 0:
        return min(count, d)
    return min(d, max(1, round(fraction * d)))


def _rice_bits(gaps: torch.Tensor) -> int:
    """The Rice parameter r that minimizes k*r + sum(gaps >> r) + k."""
    costs = [r * gaps.numel() + int((gaps >> r).sum()) for r in range(MAX_RICE_BITS + 1)]
    return min(range(MAX_RICE_BITS + 1), key=costs.__getitem__)


def encode_positions(positions: torch.Tensor, d: int) -> dict[str, Section]:
    """Sorted distinct positions in [0, d) as a bitmap or a Rice code of their gaps,
    whichever takes fewer bytes."""
    k = positions.numel()
    prev = torch.cat((positions.new_full((1,), -1), positions[:-1]))
    gaps = positions - prev - 1
    r = _rice_bits(gaps) if k else 0
    high = gaps >> r
    unary_len = int(high.sum()) + k
    if packed_len(d, 1) <= packed_len(k * r, 1) + packed_len(unary_len, 1):
        bitmap = torch.zeros(d, dtype=torch.uint8, device=positions.device)
        bitmap[positions] = 1
        return {"bitmap": Section.from_ints("bitmap", bitmap, 1)}
    low = torch.empty(k, r, dtype=torch.uint8, device=positions.device)
    for j in range(r):
        low[:, j] = (gaps >> j) & 1
    # unary: high[i] ones then a zero that ends gap i
    unary = torch.ones(unary_len, dtype=torch.uint8, device=positions.device)
    unary[torch.cumsum(high + 1, 0) - 1] = 0
    return {"gap_low": Section.from_ints("gap_low", low.reshape(-1), 1),
            "gap_high": Section.from_ints("gap_high", unary, 1)}


def decode_positions(enc: Encoded, k: int, device=None) -> torch.Tensor:
    """The k sorted positions; WireError if the sections do not describe k distinct
    positions in [0, numel)."""
    d = enc.numel
    if "bitmap" in enc.sections:
        expect_section(enc, "bitmap", d, 1)
        positions = torch.nonzero(enc.section("bitmap").ints(device)).reshape(-1)
        if positions.numel() != k:
            raise WireError(f"sections['bitmap']: {positions.numel()} bits set, expected {k}")
        return positions
    low_s, high_s = enc.section("gap_low"), enc.section("gap_high")
    if low_s.bits != 1 or high_s.bits != 1:
        raise WireError("sections['gap_low'/'gap_high'].bits: expected 1")
    r = low_s.count // k if k else 0
    if low_s.count != k * r or r > MAX_RICE_BITS:
        raise WireError(f"sections['gap_low'].count: {low_s.count} is not k * r for k = {k} "
                        f"and r <= {MAX_RICE_BITS}")
    if high_s.count < k or high_s.count > d + k:
        raise WireError(f"sections['gap_high'].count: {high_s.count} outside [{k}, {d + k}]")
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    unary = high_s.ints(device)
    ends = torch.nonzero(unary == 0).reshape(-1)
    if ends.numel() != k or int(ends[-1]) != high_s.count - 1:
        raise WireError(f"sections['gap_high']: expected {k} unary codes ending the section")
    high = torch.diff(ends, prepend=ends.new_full((1,), -1)) - 1
    if bool((high > (d >> r)).any()):
        raise WireError("sections['gap_high']: a gap exceeds the vector length")
    weights = torch.pow(2, torch.arange(r, device=unary.device, dtype=torch.int64))
    low = (low_s.ints(device).view(k, r) * weights).sum(1)
    positions = torch.cumsum((high << r) + low + 1, 0) - 1
    if int(positions[-1]) >= d:
        raise WireError(f"sections['gap_low'/'gap_high']: position {int(positions[-1])} "
                        f"is outside [0, {d})")
    return positions


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
        positions = torch.sort(torch.topk(flat.abs(), k).indices).values
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
        return self._new_encoded(x, seed,
                                 sections={"values": self._values_section(flat[positions])})

    def validate(self, enc: Encoded) -> None:
        self._check_values(enc)

    def decode(self, enc: Encoded, device=None) -> torch.Tensor:
        d, k = enc.numel, self.k_for(enc.numel)
        values = enc.section("values").raw("float", device).to(torch.float64)
        positions = fqr.random_subset(enc.seed, fqr.Purpose.SUBSET, d, k, device=values.device)
        out = torch.zeros(d, dtype=torch.float64, device=values.device)
        out[positions] = values * (d / k) if k else values
        return out.to(torch.float32)
