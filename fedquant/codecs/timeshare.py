"""Time-sharing: quantize a shared-seed random subset finely, drop the rest, rescale.

The inner-product quantization notes after Ordentlich and Polyanskiy (2024), section 6 ("A
glimpse of the solution"): at a low rate R, select a random subset
S of a fraction kappa of the coordinates, quantize those with high precision and ignore the
rest. Here S comes from the shared seed (``fedquant.random.random_subset``,
``Purpose.SUBSET``; nothing is sent for it), x_S is sent with unbiased EDEN at
`inner_bits` bits per kept coordinate (the RHT paper section 4), and the receiver returns
(d / k) * EDEN(x_S) on S and 0 elsewhere, which is unbiased. kappa = bits / inner_bits,
so the payload is `bits` per coordinate; the error is about
(1 + vNMSE_EDEN(inner_bits)) / kappa - 1 times ||x||^2.

Example::

    enc = fq.get_codec("timeshare", bits=1.0, inner_bits=4).encode(grad, seed=3)
"""

from __future__ import annotations

import torch

from fedquant import random as fqr
from fedquant.codecs.base import Codec, check_input, check_seed, register_codec
from fedquant.codecs.eden import Eden
from fedquant.wire import Encoded


@register_codec
class TimeShare(Codec):
    """Time-sharing over a shared random subset (Ordentlich and Polyanskiy section 6), unbiased.

    Args:
        bits (float, default 1.0): target payload bits per coordinate (0 < bits <= inner_bits).
        inner_bits (int, default 8): EDEN bits per kept coordinate, 1..8.
    """

    name = "timeshare"
    unbiased = True

    def __init__(self, bits: float = 1.0, inner_bits: int = 8):
        if not isinstance(inner_bits, int) or not 1 <= inner_bits <= 8:
            raise ValueError(f"inner_bits must be an integer in 1..8, got {inner_bits!r}")
        if not isinstance(bits, float | int) or not 0 < bits <= inner_bits:
            raise ValueError(f"bits must be in (0, inner_bits={inner_bits}], got {bits!r}")
        self.bits, self.inner_bits = float(bits), inner_bits
        self._inner = Eden(bits=inner_bits, scale="unbiased", rotations="auto")

    @property
    def kappa(self) -> float:
        """The fraction of coordinates kept."""
        return self.bits / self.inner_bits

    def kept(self, d: int) -> int:
        return 0 if d == 0 else min(d, max(1, round(self.kappa * d)))

    def _inner_encoded(self, enc: Encoded) -> Encoded:
        """The EDEN encoding of the kept coordinates that `enc` carries."""
        return Encoded(codec=self._inner.name, params=self._inner.wire_params(),
                       shape=(self.kept(enc.numel),), dtype=torch.float32, seed=enc.seed,
                       rotations=enc.rotations, scales=enc.scales, sections=enc.sections)

    def encode(self, x: torch.Tensor, seed: int = 0) -> Encoded:
        flat = check_input(x)
        subset = fqr.random_subset(check_seed(seed), fqr.Purpose.SUBSET, flat.numel(),
                                   self.kept(flat.numel()), device=flat.device)
        inner = self._inner.encode(flat[subset], seed)
        return self._new_encoded(x, seed, rotations=inner.rotations, scales=inner.scales,
                                 sections=inner.sections)

    def validate(self, enc: Encoded) -> None:
        self._inner.validate(self._inner_encoded(enc))

    def decode(self, enc: Encoded, device=None) -> torch.Tensor:
        d, k = enc.numel, self.kept(enc.numel)
        kept = self._inner.decode(self._inner_encoded(enc), device).to(torch.float64)
        subset = fqr.random_subset(enc.seed, fqr.Purpose.SUBSET, d, k, device=kept.device)
        out = torch.zeros(d, dtype=torch.float64, device=kept.device)
        if k:
            out[subset] = kept * (d / k)
        return out.to(torch.float32)
