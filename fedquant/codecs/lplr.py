"""LPLR: low-precision low-rank factorization of a matrix, and its SVD baselines.

LPLR (Saha, Srivastava and Pilanci, "Matrix Compression via Randomized Low Rank and Low
Precision Factorization", NeurIPS 2023, https://arxiv.org/abs/2310.11028), Algorithm 1.
A 2-D tensor A (n x d) is sent as two quantized factors L (n x m) and
R (m x d) with A ~ L R:

1. S (d x m), entries N(0, 1/m), is regenerated from the seed (``fedquant.random.normals``,
   ``Purpose.SKETCH``); it is never sent, and the receiver never even needs it.
2. L = Q(A S): the uniformly dithered quantizer of LPLR (Saha et al.) eq (1) with ``bits`` bits.
3. W* = argmin_W ||L W - A||_F = pinv(L) A (Algorithm 1 line 4, least squares).
4. R = Q'(W*) with ``bits_right`` bits.

The dynamic range of each quantizer is measured (R_Q = max|A S|, R_Q' = max|W*|), so the
quantizer never saturates, and sent as two float64 scales; the dither uniforms come from
``fedquant.random`` (``Purpose.DITHER``), indices [0, n m) for L and [n m, n m + m d) for R.
The receiver computes L R. The wire carries sections ``L`` (n m values of ``bits`` bits) and
``R`` (m d values of ``bits_right`` bits) and the scales (R_Q, R_Q').

Baselines (LPLR (Saha et al.) section 2.2 and appendices H, I):

* ``dsvd`` (direct-SVD quant., Algorithm 2): L = Q((U S)_k), R = Q'(V_k^T).
* ``lplr-svd`` (Algorithm 3): L = Q((U S)_k), R = Q'(pinv(L) A).

``rank`` is the sketch size m for ``lplr`` and the target rank k for the SVD codecs. The
paper's bit parity rule (section 4, App. J) is ``B n m + B' m d = B_nq n d``; see
:func:`parity_rank`. The codecs accept 2-D tensors only; :func:`encode_model_update` applies
a matrix codec to the 2-D tensors of a model update and another codec to the rest.

Example::

    enc = fq.get_codec("lplr", rank=16, bits=4, bits_right=8).encode(weight, seed=3)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedquant.codecs.base import (
    Codec,
    check_input,
    check_seed,
    expect_scales,
    expect_section,
    register_codec,
)
from fedquant.random import Purpose, derive_seed, normals, uniforms64
from fedquant.wire import Encoded, Section, WireError


def dithered_quantize(
    x: torch.Tensor, bits: int, seed: int, start: int = 0
) -> tuple[torch.Tensor, float]:
    """LPLR (Saha et al.) eq (1): unbiased stochastic rounding onto 2^bits points spanning [-R, R].

    R = max|x| is measured (so nothing saturates). Returns the level indices in
    [0, 2^bits) and R; :func:`dithered_dequantize` maps them back to -R + k * 2R / (2^bits - 1).
    The uniforms are ``uniforms64(seed, DITHER)`` at indices [start, start + numel).
    """
    flat = x.reshape(-1).to(torch.float64)
    top = (1 << bits) - 1
    radius = float(flat.abs().max()) if flat.numel() else 0.0
    if radius == 0.0:
        return torch.zeros(flat.numel(), dtype=torch.int64, device=flat.device), 0.0
    t = (flat + radius) * (top / (2 * radius))  # position on the grid, in [0, top]
    low = torch.floor(t)
    u = uniforms64(seed, Purpose.DITHER, flat.numel(), flat.device, start)
    idx = low + (u < (t - low)).to(torch.float64)  # round up with probability r (eq 1)
    return idx.clamp_(0, top).to(torch.int64), radius


def dithered_dequantize(idx: torch.Tensor, radius: float, bits: int) -> torch.Tensor:
    """The grid point -R + k * Delta, Delta = 2R / (2^bits - 1), as float64."""
    top = (1 << bits) - 1
    return idx.to(torch.float64) * (2 * radius / top) - radius


def parity_rank(n: int, d: int, bits: int, bits_right: int, bits_naive: float) -> int:
    """The largest rank m with B n m + B' m d <= B_nq n d (LPLR's bit parity rule)."""
    return int(bits_naive * n * d // (bits * n + bits_right * d))


def gaussian_sketch(d: int, m: int, seed: int, device=None) -> torch.Tensor:
    """S (d x m) with S_ij ~ N(0, 1/m), from ``fedquant.random`` (float64)."""
    s = normals(seed, Purpose.SKETCH, d * m, device).to(torch.float64)
    return s.reshape(d, m) / math.sqrt(m)


def _check_bits(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 8:
        raise ValueError(f"{name} must be an integer in 1..8, got {value!r}")
    return value


class _LowRank(Codec):
    """Shared mechanics of the factor codecs: subclasses choose the two factors."""

    def __init__(self, rank: int = 8, bits: int = 8, bits_right: int = 8):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        self.rank = rank
        self.bits = _check_bits("bits", bits)
        self.bits_right = _check_bits("bits_right", bits_right)

    def left_factor(self, a: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unquantized left factor (n x rank, float64), and the right factor when it
        does not depend on the quantized left one (direct-SVD), else None."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, seed: int = 0) -> Encoded:
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"codec '{self.name}' encodes 2-D tensors (n x d), got {shape}; "
                             "use fedquant.codecs.lplr.encode_model_update for other tensors")
        n, d = x.shape
        if self.rank > min(n, d):
            raise ValueError(f"rank={self.rank} exceeds min(n, d) = {min(n, d)} for shape "
                             f"{[n, d]}")
        a = check_input(x).reshape(n, d).to(torch.float64)
        seed = check_seed(seed)
        left, right = self.left_factor(a, seed)
        left_idx, left_range = dithered_quantize(left, self.bits, seed)
        if right is None:  # W* = argmin_W ||Q(L) W - A||_F (Algorithm 1 line 4)
            left = dithered_dequantize(left_idx, left_range, self.bits).reshape(n, self.rank)
            right = torch.linalg.pinv(left) @ a
        right_idx, right_range = dithered_quantize(right, self.bits_right, seed,
                                                   start=n * self.rank)
        return self._new_encoded(x, seed, scales=(left_range, right_range), sections={
            "L": Section.from_ints("L", left_idx, self.bits),
            "R": Section.from_ints("R", right_idx, self.bits_right)})

    def validate(self, enc: Encoded) -> None:
        if len(enc.shape) != 2:
            raise WireError(f"shape: codec '{self.name}' needs a 2-D shape, got "
                            f"{list(enc.shape)}")
        n, d = enc.shape
        if self.rank > min(n, d):
            raise WireError(f"params.rank: {self.rank} exceeds min(n, d) = {min(n, d)}")
        expect_section(enc, "L", n * self.rank, self.bits)
        expect_section(enc, "R", self.rank * d, self.bits_right)
        expect_scales(enc, 2)
        if any(s < 0 for s in enc.scales):
            raise WireError(f"scales: dynamic ranges must be >= 0, got {list(enc.scales)}")

    def decode(self, enc: Encoded, device=None) -> torch.Tensor:
        n, d = enc.shape
        left = dithered_dequantize(enc.section("L").ints(device), enc.scales[0], self.bits)
        right = dithered_dequantize(enc.section("R").ints(device), enc.scales[1],
                                    self.bits_right)
        # the product in float32: the n x d output is the only large allocation of a decode
        left, right = left.to(torch.float32), right.to(torch.float32)
        return (left.reshape(n, self.rank) @ right.reshape(self.rank, d)).reshape(-1)


@register_codec
class Lplr(_LowRank):
    """LPLR (Saha et al., Algorithm 1): L = Q(A S), R = Q'(pinv(L) A), S a shared Gaussian
    sketch.

    Args:
        rank (int, default 8): sketch size m (columns of L), 1..min(n, d).
        bits (int, default 8): bits B per entry of L, 1..8.
        bits_right (int, default 8): bits B' per entry of R, 1..8.
    """

    name = "lplr"

    def left_factor(self, a, seed):
        return a @ gaussian_sketch(a.shape[1], self.rank, seed, a.device), None


def _scaled_left_singular(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :k] * s[:k], vh[:k]


@register_codec
class LplrSvd(_LowRank):
    """LPLR-SVD (LPLR (Saha et al.) Algorithm 3): L = Q((U Sigma)_k), R = Q'(pinv(L) A).

    Args:
        rank (int, default 8): target rank k, 1..min(n, d).
        bits (int, default 8): bits B per entry of L, 1..8.
        bits_right (int, default 8): bits B' per entry of R, 1..8.
    """

    name = "lplr-svd"

    def left_factor(self, a, seed):
        return _scaled_left_singular(a, self.rank)[0], None


@register_codec
class DirectSvd(_LowRank):
    """Direct-SVD quant. (LPLR (Saha et al.) Algorithm 2): L = Q((U Sigma)_k), R = Q'(V_k^T).

    Args:
        rank (int, default 8): target rank k, 1..min(n, d).
        bits (int, default 8): bits B per entry of L, 1..8.
        bits_right (int, default 8): bits B' per entry of R, 1..8.
    """

    name = "dsvd"

    def left_factor(self, a, seed):
        return _scaled_left_singular(a, self.rank)  # (U Sigma)_k and V_k^T


def encode_model_update(
    tensors: Mapping[str, torch.Tensor], matrix_codec: Codec, vector_codec: Codec, seed: int
) -> dict[str, Encoded]:
    """Encode every tensor of a model update by a per-tensor policy.

    2-D tensors whose smaller side is at least the matrix codec's rank go to
    `matrix_codec` (e.g. ``lplr``); everything else (biases, small matrices) goes to
    `vector_codec` (e.g. ``eden``). Tensor i uses the seed ``derive_seed(seed, i)``.
    """
    rank = getattr(matrix_codec, "rank", 1)
    out = {}
    for i, (name, t) in enumerate(tensors.items()):
        codec = matrix_codec if t.dim() == 2 and min(t.shape) >= rank else vector_codec
        out[name] = codec.encode(t, seed=derive_seed(seed, i))
    return out


__all__ = ["DirectSvd", "Lplr", "LplrSvd", "dithered_dequantize", "dithered_quantize",
           "encode_model_update", "gaussian_sketch", "parity_rank"]
