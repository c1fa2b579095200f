"""EDEN at a real bit budget (0.5, 1.5, 2.5 ...), unbiased, by mixing integer budgets.

EDEN (Vargaftik et al., ICML 2022, https://arxiv.org/abs/2108.08842) handles
heterogeneous budgets, and budgets below one bit by random sparsification with shared
randomness (its section on b < 1): the sender keeps a shared-seed random subset of the
coordinates, quantizes it with 1-bit EDEN, and the receiver scales it by d / k. Here:

* ``bits < 1``: that scheme. A shared-seed subset S of k coordinates
  (``fedquant.random.random_subset``, Purpose.SUBSET, nothing sent for it) is sent with
  unbiased 1-bit EDEN and the receiver returns (d / k) * EDEN(x_S) on S, 0 elsewhere:
  unbiased over the subset, error about (1 + vNMSE_1) d / k - 1 times ||x||^2.
* ``bits >= 1``: the first k coordinates with b + 1 EDEN bits and the other d - k with b,
  each part its own unbiased EDEN encoding (rotated on its own, so the union is unbiased
  with no rescaling).

b and k are chosen from the payload rate left once the header is paid, so that the
measured wire bytes, header and slice padding included, are the budget floor(bits * d / 8)
(re-encoding with the measured overhead, at most four times): within 2% of the request
for d >= 2^14, integer budgets included (2 bits is then mostly 2-bit EDEN and a few
1-bit coordinates that pay for the header).

Wire: sections "q_hi" (the part with more bits, or the kept subset) and "q_lo"; scales k
(the hi part's size), then the hi part's EDEN scales, then the lo part's; one rotation
count for both parts.

Example::

    enc = fq.get_codec("eden-mix", bits=1.5).encode(grad, seed=3)
"""

from __future__ import annotations

import math

import torch

from fedquant import random as fqr
from fedquant.codecs.base import Codec, check_input, check_seed, register_codec
from fedquant.codecs.eden import Eden
from fedquant.packing import packed_len
from fedquant.rotation import check_rotations, padded_size, resolve_rotations, slice_layout
from fedquant.wire import Encoded, Section, WireError

MIN_BITS, MAX_BITS = 1.0 / 32, 8.0


@register_codec
class EdenMix(Codec):
    """EDEN at a real bit budget, unbiased (see the module docstring).

    Args:
        bits (float, default 1.5): bits per coordinate on the wire, header included, in
            [1/32, 8].
        rotations (int | str, default "auto"): composed RHTs of each part, 0..3 or
            "auto" (0 = none: biased, like EDEN without a rotation).
    """

    name = "eden-mix"
    unbiased = True

    def __init__(self, bits: float = 1.5, rotations: str = "auto"):
        if isinstance(bits, bool) or not isinstance(bits, int | float) or not (
                math.isfinite(bits) and MIN_BITS <= bits <= MAX_BITS):
            raise ValueError(f"bits must be a real number in [{MIN_BITS}, {MAX_BITS}], "
                             f"got {bits!r}")
        check_rotations(rotations)
        self.bits, self.rotations = float(bits), str(rotations)

    @staticmethod
    def plan(d: int, budget_bytes: int, overhead: float) -> tuple[int, int, int]:
        """(hi, lo, k): EDEN bits of the two parts and the hi part's size, so that
        k * hi + (d - k) * lo bits plus `overhead` bytes fill `budget_bytes` (lo = 0: the
        other coordinates are dropped, and k is a random subset)."""
        if d == 0:
            return 1, 0, 0
        rate = min(max(8.0 * (budget_bytes - overhead) / d, 1.0 / d), float(MAX_BITS))
        lo = min(math.floor(rate), int(MAX_BITS) - 1)
        hi = lo + 1
        k = round((rate - lo) * d)
        return hi, lo, min(d, max(1 if lo == 0 else 0, k))

    def _split(self, d: int, k: int, lo: int, seed: int, device) -> tuple:
        """Indices of the hi part and of the lo part."""
        if lo == 0:
            return fqr.random_subset(seed, fqr.Purpose.SUBSET, d, k, device=device), None
        return slice(0, k), slice(k, d)

    def encode(self, x: torch.Tensor, seed: int = 0) -> Encoded:
        flat = check_input(x)
        seed = check_seed(seed)
        d = flat.numel()
        r = resolve_rotations(self.rotations, flat, "scalar") if d else 1
        budget = math.floor(self.bits * d / 8)
        overhead, seen, plan = 48.0, set(), None  # header guess; measured and corrected
        for _ in range(4):
            candidate = self.plan(d, budget, overhead)
            if candidate in seen:
                break
            seen.add(candidate)
            plan = hi, lo, k = candidate
            # everything but the ideal k * hi + (d - k) * lo bits: header and slice padding
            overhead = self._wire_size(x, seed, r, d, plan) - (k * hi + (d - k) * lo) / 8
        return self._encode_plan(x, flat, seed, r, plan)

    def _parts(self, d: int, plan: tuple[int, int, int]) -> list[tuple[str, int, int]]:
        """(section, bits, size) of each part of a plan."""
        hi, lo, k = plan
        return [("q_hi", hi, k)] + ([("q_lo", lo, d - k)] if lo else [])

    def _wire_size(self, x: torch.Tensor, seed: int, r: int, d: int,
                   plan: tuple[int, int, int]) -> int:
        """The bytes on the wire of a plan's encoding, without quantizing: its sections'
        lengths and scale count are known, and neither their contents nor the scale values
        change the size (the scales are fixed-width doubles)."""
        parts = self._parts(d, plan)
        sections = {name: Section(name, bits, padded_size(n),
                                  bytes(packed_len(padded_size(n), bits)))
                    for name, bits, n in parts}
        scales = (0.0,) * (1 + sum(len(slice_layout(n)) for _, _, n in parts))
        return self._new_encoded(x, seed, rotations=r, sections=sections,
                                 scales=scales).nbytes

    def _encode_plan(self, x: torch.Tensor, flat: torch.Tensor, seed: int, r: int,
                     plan: tuple[int, int, int]) -> Encoded:
        """EDEN over the plan's two parts (or its random subset)."""
        hi, lo, k = plan
        ihi, ilo = self._split(flat.numel(), k, lo, seed, flat.device)
        parts = [Eden(hi, "unbiased", r).encode(flat[ihi], seed)]
        if lo:
            parts.append(Eden(lo, "unbiased", r).encode(flat[ilo], fqr.derive_seed(seed, 1)))
        sections = {name: _renamed(p.section("q"), name)
                    for name, p in zip(("q_hi", "q_lo"), parts, strict=False)}
        return self._new_encoded(x, seed, rotations=r, sections=sections,
                                 scales=(float(k), *(s for p in parts for s in p.scales)))

    def _inner(self, enc: Encoded) -> list[tuple[Eden, Encoded]]:
        """(codec, encoding) of each part, rebuilt from the payload; WireError if the
        section widths, the part size (scales[0]) or the scale count do not fit."""
        d = enc.numel
        names = sorted(enc.sections)
        if names not in (["q_hi"], ["q_hi", "q_lo"]):
            raise WireError(f"sections: expected ['q_hi'] or ['q_hi', 'q_lo'], got {names}")
        hi = enc.section("q_hi").bits
        lo = enc.section("q_lo").bits if "q_lo" in enc.sections else 0
        if not (1 <= hi <= MAX_BITS and (lo == 0 or lo == hi - 1)):
            raise WireError(f"sections: bit widths hi={hi}, lo={lo}; expected 1..8 with "
                            "lo = hi - 1 (or no q_lo)")
        if not enc.scales:
            raise WireError("scales: missing the part size (scales[0])")
        k = enc.scales[0]
        if not (k == int(k) and 0 <= k <= d):
            raise WireError(f"scales[0] (part size): must be an integer in 0..{d}, got {k}")
        k = int(k)
        sizes = [(hi, k, "q_hi", enc.seed)]
        if lo:
            sizes.append((lo, d - k, "q_lo", fqr.derive_seed(enc.seed, 1)))
        out, at = [], 1
        for bits, n, name, seed in sizes:
            codec = Eden(bits, "unbiased", enc.rotations)
            count = len(slice_layout(n))
            inner = Encoded(codec="eden", params=codec.wire_params(), shape=(n,),
                            dtype=torch.float32, seed=seed, rotations=enc.rotations,
                            scales=enc.scales[at: at + count],
                            sections={"q": _renamed(enc.section(name), "q")})
            at += count
            out.append((codec, inner))
        if at != len(enc.scales):
            raise WireError(f"scales: expected {at} for the parts of shape "
                            f"{list(enc.shape)}, got {len(enc.scales)}")
        return out

    def validate(self, enc: Encoded) -> None:
        if enc.rotations > 3:
            raise WireError(f"rotations: must be 0..3, got {enc.rotations}")
        for codec, inner in self._inner(enc):
            codec.validate(inner)

    def decode(self, enc: Encoded, device=None) -> torch.Tensor:
        d = enc.numel
        inner = self._inner(enc)
        parts = [codec.decode(e, device) for codec, e in inner]
        if len(parts) == 1:  # a random subset, rescaled (EDEN's b < 1)
            k = parts[0].numel()
            out = torch.zeros(d, dtype=torch.float32, device=parts[0].device)
            if k:
                subset = fqr.random_subset(enc.seed, fqr.Purpose.SUBSET, d, k,
                                           device=out.device)
                out[subset] = parts[0] * (d / k)
            return out
        return torch.cat(parts)


def _renamed(section: Section, name: str) -> Section:
    return Section(name, section.bits, section.count, section.data)


__all__ = ["EdenMix"]
