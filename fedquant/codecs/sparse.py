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
