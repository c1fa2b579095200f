"""The skeleton every rotation-based codec shares: rotate, quantize per slice, unrotate.

EDEN / DRIVE (EDEN, Vargaftik et al., ICML 2022, https://proceedings.mlr.press/v162/vargaftik22a.html),
vector quantization over three RHTs, QUIC-FL (Ben-Basat et al., ICML 2024) and the
dithered / stochastic uniform quantizers all do the same around their own quantizer:

1. validate the input and the seed, resolve ``rotations`` ("auto" runs the linear-time
   flatness check of the codec's ``kind``, fedquant.rotation.auto_rotations);
2. rotate the flat input slice by slice (fedquant.rotation.rotate) with the rotation seed
   (the client's seed, or a round seed shared by all clients);
3. quantize each power-of-two slice with a float64 scale (:meth:`RotatedCodec.quantize`,
   the one method a codec must write), often S = ||z||^2 / <z, c> (unbiased) or
   <z, c> / ||c||^2 (least squares): :meth:`RotatedCodec.slice_scale`;
4. on the receiver, rebuild the rotated-domain values (:meth:`decode_rotated`) and undo
   the rotations once.

A new rotation-based codec is one class with ``quantize``, ``decode_rotated`` and its
section checks (docs/kernels.md shows a 1-bit sign codec in about 30 lines).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from fedquant import cpu_kernels
from fedquant.codecs.base import (
    FLOAT32_MAX,
    Codec,
    all_finite,
    check_input,
    check_seed,
    expect_scales,
)
from fedquant.rotation import (
    check_rotations,
    fused_available,
    resolve_rotations,
    rotate,
    rotate_checked,
    slice_layout,
    unrotate,
)
from fedquant.wire import Encoded, Section, WireError

SCALES = ("unbiased", "biased")
MAX_ROTATIONS = 3


def check_scale(scale: str) -> str:
    """`scale` if it is "unbiased" or "biased", else ValueError."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return scale


def slice_norm(z: torch.Tensor) -> float:
    """||z|| in float64: one fused numba pass for float32 CPU slices, torch elsewhere."""
    if cpu_kernels.usable(z):
        return math.sqrt(cpu_kernels.sum_squares(z))
    return float(torch.linalg.vector_norm(z.to(torch.float64)))


def slice_values(scales: Sequence[float], d: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Each slice's scale repeated over its coordinates of the padded rotated vector."""
    sizes = torch.tensor([s.size for s in slice_layout(d)], dtype=torch.int64, device=device)
    return torch.repeat_interleave(torch.tensor(list(scales), dtype=dtype, device=device),
                                   sizes)


class RotatedCodec(Codec):
    """Base class of the codecs that quantize a randomized-Hadamard rotation of x.

    Subclasses set `name` and `kind` ("scalar" or "vector": which flatness check
    ``rotations="auto"`` runs), call :meth:`set_rotations` in ``__init__``, and implement
    :meth:`quantize` and :meth:`decode_rotated` (and extend :meth:`validate`).
    """

    kind: ClassVar[str] = "scalar"
    #: with rotations = 0, quantize x itself (True) or the zero-padded slices (False)
    raw_without_rotation: ClassVar[bool] = False
    rotations: str
    scale: str

    def set_rotations(self, rotations: int | str) -> None:
        """Validate and store the `rotations` parameter (0..3 or "auto")."""
        check_rotations(rotations)
        self.rotations = str(rotations)

    @property
    def is_unbiased(self) -> bool:
        """With a `scale` parameter: whether it is "unbiased"; else the class's flag."""
        scale = getattr(self, "scale", None)
        return self.unbiased if scale is None else scale == "unbiased"

    def rotation_seed(self, seed: int) -> int:
        """The seed of the RHTs for a client seed (codecs with a shared round rotation
        override this)."""
        return seed

    # ---- sender ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, seed: int = 0) -> Encoded:
        # On the CPU with numba the NaN / Inf check, the "auto" check and each slice's
        # norm come from the first RHT's pass 1 (fedquant.rotation.rotate_checked).
        fused = self.rotations != "0" and fused_available(x)
        flat = check_input(x, check_finite=not fused)
        seed = check_seed(seed)
        if fused:
            z, k, squares = rotate_checked(flat, self.rotation_seed(seed), self.rotations,
                                           self.kind)
            # |z_i| <= ||x||: only an input with a slice norm past float32's range can
            # overflow its rotation, and only then is z checked
            if max(squares, default=0.0) > FLOAT32_MAX**2:
                self._check_rotation(z, flat)
            scales, sections = self.quantize_normed(z, flat.numel(), seed, k,
                                                    [math.sqrt(q) for q in squares])
        else:
            k = resolve_rotations(self.rotations, flat, self.kind)
            if k == 0 and self.raw_without_rotation:
                z = flat
            else:
                z = rotate(flat, self.rotation_seed(seed), k)
                self._check_rotation(z, flat)
            scales, sections = self.quantize(z, flat.numel(), seed, k)
        if not all(math.isfinite(s) for s in scales):
            raise self._too_large(flat)
        return self._new_encoded(x, seed, rotations=k, scales=tuple(scales),
                                 sections=sections)

    def _check_rotation(self, z: torch.Tensor, flat: torch.Tensor) -> None:
        if not all_finite(z):
            raise self._too_large(flat)

    def _too_large(self, flat: torch.Tensor) -> ValueError:
        return ValueError(
            f"{self.name}: the input is too large to encode: its rotated coordinates or "
            f"scales overflow float32 (max |x| = {float(flat.abs().max()):.3g}); "
            "scale it down first")

    def quantize(self, z: torch.Tensor, d: int, seed: int,
                 rotations: int) -> tuple[list[float], dict[str, Section]]:
        """(float64 scales, wire sections) of the rotated vector z of a d-coordinate input."""
        raise NotImplementedError

    def quantize_normed(self, z: torch.Tensor, d: int, seed: int, rotations: int,
                        norms: Sequence[float]) -> tuple[list[float], dict[str, Section]]:
        """:meth:`quantize`, told each slice's float64 ||x|| (= ||z|| up to float rounding,
        summed in the first RHT's pass): a codec that scales by ||z|| overrides this to
        take its indices with it while it sums ||z||, instead of in a pass of its own."""
        return self.quantize(z, d, seed, rotations)

    def slice_scale(self, norm: float, dot: float,
                    codeword_norm2: Callable[[], float]) -> float:
        """The float64 scale of one slice from ||z||, <z, c> and ||c||^2 (asked only for
        the biased scale): ||z||^2 / <z, c> if unbiased (EDEN section 4.2), else the
        least-squares <z, c> / ||c||^2; 0 when the slice is zero or <z, c> <= 0."""
        if norm == 0 or dot <= 0:
            return 0.0
        if self.scale == "unbiased":
            return norm * norm / dot
        return dot / codeword_norm2()

    # ---- receiver ----------------------------------------------------------------------
    def validate(self, enc: Encoded) -> None:
        """The rotation count; subclasses add their sections and scale counts."""
        if enc.rotations > MAX_ROTATIONS:
            raise WireError(f"rotations: must be 0..{MAX_ROTATIONS}, got {enc.rotations}")

    def expect_slice_scales(self, enc: Encoded, per_slice: int = 1) -> None:
        """WireError unless enc has `per_slice` scales for every slice of its shape."""
        expect_scales(enc, per_slice * len(slice_layout(enc.numel)))

    def decode_rotated(self, enc: Encoded, device: torch.device | str | None = None
                       ) -> torch.Tensor:
        """The client's estimate in the rotated domain (before the inverse RHTs)."""
        raise NotImplementedError

    def unrotate(self, values: torch.Tensor, enc: Encoded,
                 inplace: bool = False) -> torch.Tensor:
        """Undo the encoding's rotations (identity for a raw vector at rotations = 0);
        `inplace` overwrites `values` (see fedquant.rotation.unrotate)."""
        if enc.rotations == 0 and self.raw_without_rotation:
            return values
        return unrotate(values, self.rotation_seed(enc.seed), enc.rotations, enc.numel,
                        inplace=inplace)

    def decode(self, enc: Encoded, device: torch.device | str | None = None) -> torch.Tensor:
        values = self.decode_rotated(enc, device)
        if values.dtype != torch.float32:
            values = values.to(torch.float32)
        # decode_rotated returns a fresh tensor: invert it where it lies (no allocation)
        return self.unrotate(values, enc, inplace=True)


__all__ = ["MAX_ROTATIONS", "SCALES", "RotatedCodec", "check_scale", "slice_norm",
           "slice_values"]
