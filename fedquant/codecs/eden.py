"""EDEN and DRIVE: rotate, quantize each coordinate to a Lloyd-Max centroid, send one scale.

the RHT paper ("Quantizing With Randomized Hadamard Transforms: Efficient Heuristic Now
Proven", 2026) section 4 (DRIVE, and EDEN, its b-bit generalization). Each power-of-two slice
z = RHT^k(x) is normalized to t = z * sqrt(n) / ||x||, which is near N(0, 1) after the
rotations, and every t_i is sent as the index of its nearest Lloyd-Max centroid c_i of
N(0, 1) (``fedquant/data/lloyd_max.json``). The receiver rebuilds S * c and inverts the
rotations. The scale S is

* ``scale="unbiased"``: S = ||x||^2 / <z, c>, which makes the estimate unbiased under a
  uniform random rotation (the RHT paper section 4.2; vNMSE pi/2 - 1 at b = 1);
* ``scale="biased"``: S = <z, c> / ||c||^2, the least-squares scale (vNMSE 1 - 2/pi at b = 1).

Scales are computed in float64, one per slice. DRIVE is EDEN at b = 1 (its sign
quantizer with centroids +-sqrt(2/pi) differs only by the scale, which S absorbs).

Example::

    enc = fq.get_codec("eden", bits=2).encode(grad, seed=7)
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import torch

from fedquant import buffers, cpu_kernels
from fedquant.codecs.base import Codec, expect_section, register_codec, restore
from fedquant.codecs.rotated import SCALES, RotatedCodec, check_scale, slice_values
from fedquant.rotation import padded_size, slice_layout
from fedquant.wire import Encoded, Section

_TABLE = pathlib.Path(__file__).resolve().parents[1] / "data" / "lloyd_max.json"


@functools.cache
def lloyd_max_centroids(bits: int) -> torch.Tensor:
    """The 2^bits Lloyd-Max centroids of N(0, 1), ascending (float64)."""
    table = json.loads(_TABLE.read_text())
    return torch.tensor(table[str(bits)]["centroids"], dtype=torch.float64)


def nearest_centroid(t: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each t (boundaries are the midpoints)."""
    mids = ((centroids[1:] + centroids[:-1]) / 2).to(t.dtype)
    return torch.bucketize(t, mids)


@register_codec
class Eden(RotatedCodec):
    """EDEN (the RHT paper section 4): b-bit Lloyd-Max quantization of the rotated vector.

    Args:
        bits (int, default 2): bits per coordinate, 1..8. A real budget (0.5, 1.5, 2.5)
            gives the unbiased ``eden-mix`` codec: EDEN over two integer budgets, or over
            a shared random subset below one bit, measured on the wire.
        scale (str, default "unbiased"): "unbiased" or "biased" (least squares).
        rotations (int | str, default "auto"): composed RHTs, 0..3 or "auto"
            (the RHT paper section 7's l3 check: 1 if the input is already flat, else 2).
    """

    name = "eden"

    def __new__(cls, *args: Any, **kwargs: Any) -> Codec:
        # A real budget (bits=1.5, 0.5) is EDEN over two integer budgets or a shared random
        # subset: the `eden-mix` codec (fedquant.codecs.fractional), unbiased.
        bits = kwargs.get("bits", args[0] if args else 2)
        if cls is Eden and isinstance(bits, float) and not bits.is_integer():
            scale = kwargs.get("scale", args[1] if len(args) > 1 else "unbiased")
            if scale != "unbiased":
                raise ValueError(f"a real bits ({bits}) needs scale='unbiased', got {scale!r}")
            from fedquant.codecs.fractional import EdenMix

            return EdenMix(bits, kwargs.get("rotations", args[2] if len(args) > 2 else "auto"))
        return super().__new__(cls)

    def __init__(self, bits: int = 2, scale: str = "unbiased", rotations: str = "auto"):
        if isinstance(bits, float) and bits.is_integer():
            bits = int(bits)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8 (or a real budget such as "
                             f"1.5, sent as eden-mix), got {bits!r}")
        self.bits, self.scale = bits, check_scale(scale)
        self.set_rotations(rotations)

    def quantize(self, z: torch.Tensor, d: int, seed: int,
                 rotations: int) -> tuple[list[float], dict[str, Section]]:
        return self.quantize_normed(z, d, seed, rotations, None)

    def quantize_normed(self, z: torch.Tensor, d: int, seed: int, rotations: int,
                        norms: Sequence[float] | None) -> tuple[list[float], dict[str, Section]]:
        """:meth:`quantize` with each slice's norm up to rounding given (None: none; see
        fedquant.cpu_kernels.eden_quantize)."""
        centroids = lloyd_max_centroids(self.bits).to(z.device)
        fast = cpu_kernels.usable(z)  # fused numba passes; same numbers as the torch lines
        indices = buffers.empty(z.numel(), torch.uint8 if fast else torch.int64, z.device)
        scales = []
        for i, s in enumerate(slice_layout(d)):
            zs = z[s.offset: s.offset + s.size]
            idx = indices[s.offset: s.offset + s.size]
            if fast:
                norm, dot = cpu_kernels.eden_quantize(zs, centroids, idx,
                                                      None if norms is None else norms[i])
            else:
                norm = float(torch.linalg.vector_norm(zs.to(torch.float64)))
                t = zs * float(cpu_kernels.factor_of(s.size, norm))  # 0 for a zero slice
                idx.copy_(nearest_centroid(t, centroids))
                dot = float(torch.dot(zs.to(torch.float64), centroids[idx]))

            def codeword_norm2(idx=idx) -> float:
                c = centroids[idx.long()]
                return float(torch.dot(c, c))

            scales.append(self.slice_scale(norm, dot, codeword_norm2))
        return scales, {"q": Section.from_ints("q", indices, self.bits)}

    def validate(self, enc: Encoded) -> None:
        super().validate(enc)
        expect_section(enc, "q", padded_size(enc.numel), self.bits)
        self.expect_slice_scales(enc)

    def decode_rotated(self, enc: Encoded, device=None) -> torch.Tensor:
        """The scaled centroids in the rotated domain (before the inverse RHTs)."""
        centroids = lloyd_max_centroids(self.bits).to(device)
        if cpu_kernels.runs_on(device):
            layout = [(s.offset, s.size, sc)
                      for s, sc in zip(slice_layout(enc.numel), enc.scales, strict=True)]
            return cpu_kernels.eden_dequantize(enc.section("q").data, self.bits, centroids,
                                               layout, padded_size(enc.numel))
        values = centroids[enc.section("q").ints(device)]
        return (values * slice_values(enc.scales, enc.numel, values.device)).to(torch.float32)


@register_codec
class Drive(Eden):
    """DRIVE (the RHT paper section 4): one bit per coordinate, the sign of the rotated vector.

    Args:
        scale (str, default "unbiased"): "unbiased" (S = ||x||^2 / ||z||_1) or "biased"
            (S = ||z||_1 / d).
        rotations (int | str, default "auto"): composed RHTs, 0..3 or "auto".
    """

    name = "drive"

    def __init__(self, scale: str = "unbiased", rotations: str = "auto"):
        super().__init__(bits=1, scale=scale, rotations=rotations)

    def params(self) -> dict:
        return {"scale": self.scale, "rotations": self.rotations}


__all__ = ["SCALES", "Drive", "Eden", "lloyd_max_centroids", "nearest_centroid", "restore"]
