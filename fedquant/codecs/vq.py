"""Vector quantization of the rotated vector in k-dimensional blocks, over three RHTs.

the RHT paper ("Quantizing With Randomized Hadamard Transforms: Efficient Heuristic Now
Proven", 2026) section 6. The input is rotated by three composed RHTs (Theorem 6: the third one
decorrelates the coordinates inside every fixed block, which two RHTs cannot do for sparse
inputs, Lemma 3), each power-of-two slice is normalized to t = z * sqrt(n) / ||z|| (near
N(0, I) after the rotations), t is cut into blocks of `dim` consecutive coordinates and each
block is sent as the index of its nearest centroid in a codebook of 2^(dim * bits) points
optimized for N(0, I_dim) by k-means (section 6.3; ``fedquant/data/vq_codebooks.npz`` and
the script that makes it). The receiver rebuilds S * c per slice and inverts the rotations.
The per-slice scale S is computed in float64, as EDEN's (the RHT paper section 4):

* ``scale="biased"``: S = <z, c> / ||c||^2, the least-squares scale;
* ``scale="unbiased"``: S = ||z||^2 / <z, c>, which makes the estimate unbiased under a
  uniform random rotation for any quantizer, hence also for a vector quantizer.

Supported (dim, bits): dim 2 with bits 1..4, dim 4 with bits 1..2, dim 8 with bits 1 (a
block index fits one byte). ``rotations="auto"`` runs the l4 check of the RHT paper section 7
and skips the first (smoothing) RHT when the input is already flat.

Example::

    enc = fq.get_codec("vq", bits=1, dim=8, scale="biased").encode(grad, seed=7)
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import torch

from fedquant import buffers, cpu_kernels, vq_kernel
from fedquant.codecs.base import expect_section, register_codec
from fedquant.codecs.rotated import SCALES, RotatedCodec, check_scale, slice_values
from fedquant.rotation import padded_size, slice_layout
from fedquant.wire import Encoded, Section

SUPPORTED = ((2, 1), (2, 2), (2, 3), (2, 4), (4, 1), (4, 2), (8, 1))
_TABLE = pathlib.Path(__file__).resolve().parents[1] / "data" / "vq_codebooks.npz"
_SEARCH_CHUNK = 2**22  # distances held at once in the nearest-centroid search


@functools.cache
def _codebook_cpu(dim: int, bits: int) -> torch.Tensor:
    with np.load(_TABLE) as table:
        return torch.from_numpy(table[f"k{dim}_b{bits}"].copy())


def codebook(dim: int, bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The 2^(dim*bits) x dim float32 k-means codebook of N(0, I_dim)."""
    if (dim, bits) not in SUPPORTED:
        raise ValueError(f"(dim, bits) = ({dim}, {bits}) is not supported; "
                         f"supported: {list(SUPPORTED)}")
    return _codebook_cpu(dim, bits).to(device)


def nearest_block(blocks: torch.Tensor, centroids: torch.Tensor,
                  chunk: int = _SEARCH_CHUNK) -> torch.Tensor:
    """Index of the nearest centroid for each row of `blocks` (n x dim), searched in chunks
    so that at most `chunk` distances exist at a time."""
    sq = (centroids * centroids).sum(1)
    out = torch.empty(blocks.shape[0], dtype=torch.int64, device=blocks.device)
    step = max(1, chunk // centroids.shape[0])
    for i in range(0, blocks.shape[0], step):
        # ||b - c||^2 = ||b||^2 - 2 <b, c> + ||c||^2; ||b||^2 does not change the argmin
        out[i: i + step] = torch.addmm(sq, blocks[i: i + step], centroids.T, alpha=-2).argmin(1)
    return out


def _block_count(d: int, dim: int) -> int:
    return -(-padded_size(d) // dim)


@register_codec
class VectorQuantizer(RotatedCodec):
    """Block VQ over three RHTs (the RHT paper section 6).

    Args:
        bits (int, default 1): bits per coordinate; dim * bits <= 8 (see SUPPORTED).
        dim (int, default 8): block dimension k, 2, 4 or 8.
        scale (str, default "unbiased"): "unbiased" (EDEN's scale correction) or "biased"
            (least squares).
        rotations (int | str, default 3): composed RHTs, 0..3 or "auto" (the RHT paper section
            7's l4 check: 2 if the input is already flat, else 3).
    """

    name = "vq"
    kind = "vector"

    def __init__(self, bits: int = 1, dim: int = 8, scale: str = "unbiased",
                 rotations: str = "3"):
        if (dim, bits) not in SUPPORTED:
            raise ValueError(f"(dim, bits) = ({dim!r}, {bits!r}) is not supported; "
                             f"supported: {list(SUPPORTED)}")
        self.bits, self.dim, self.scale = bits, dim, check_scale(scale)
        self.set_rotations(rotations)

    def quantize(self, z: torch.Tensor, d: int, seed: int,
                 rotations: int) -> tuple[list[float], dict[str, Section]]:
        centroids = codebook(self.dim, self.bits, z.device)
        if vq_kernel.usable(z, centroids):  # fused numba search; the torch lines elsewhere
            indices = buffers.empty(_block_count(d, self.dim), torch.uint8)
            scales = []
            for s in slice_layout(d):  # slices start at multiples of 128: whole blocks
                zs = z[s.offset: s.offset + s.size]
                first = s.offset // self.dim
                norm, dot, sq = vq_kernel.vq_quantize(
                    zs, centroids, indices[first: first - (-s.size // self.dim)])
                scales.append(self.slice_scale(norm, dot, lambda sq=sq: sq))
            return scales, {"q": Section.from_ints("q", indices, self.dim * self.bits)}
        n_blocks = _block_count(d, self.dim)
        t = z.new_zeros(n_blocks * self.dim)
        norms = []
        for s in slice_layout(d):
            zs = z[s.offset: s.offset + s.size]
            norm = float(torch.linalg.vector_norm(zs.to(torch.float64)))
            norms.append(norm)
            # the kernel's float32 factor: 0 for a zero slice (sqrt(n) / 1e-300 would be
            # inf in float32, and 0 * inf a NaN distance)
            t[s.offset: s.offset + s.size] = zs * float(cpu_kernels.factor_of(s.size, norm))
        indices = nearest_block(t.view(n_blocks, self.dim), centroids)
        c = centroids[indices].reshape(-1).to(torch.float64)
        scales = []
        for s, norm in zip(slice_layout(d), norms, strict=True):
            zs = z[s.offset: s.offset + s.size].to(torch.float64)
            cs = c[s.offset: s.offset + s.size]
            scales.append(self.slice_scale(norm, float(torch.dot(zs, cs)),
                                           lambda cs=cs: float(torch.dot(cs, cs))))
        return scales, {"q": Section.from_ints("q", indices, self.dim * self.bits)}

    def validate(self, enc: Encoded) -> None:
        super().validate(enc)
        expect_section(enc, "q", _block_count(enc.numel, self.dim), self.dim * self.bits)
        self.expect_slice_scales(enc)

    def decode_rotated(self, enc: Encoded, device=None) -> torch.Tensor:
        """The scaled centroids in the rotated domain (before the inverse RHTs)."""
        centroids = codebook(self.dim, self.bits, device)
        if cpu_kernels.runs_on(device):
            layout = [(s.offset, s.size, sc)
                      for s, sc in zip(slice_layout(enc.numel), enc.scales, strict=True)]
            return vq_kernel.vq_dequantize(enc.section("q").data, self.dim * self.bits,
                                           centroids, layout, padded_size(enc.numel))
        values = centroids[enc.section("q").ints(device)].reshape(-1)[: padded_size(enc.numel)]
        return (values * slice_values(enc.scales, enc.numel, values.device)).to(torch.float32)


__all__ = ["SCALES", "SUPPORTED", "VectorQuantizer", "codebook", "nearest_block"]
