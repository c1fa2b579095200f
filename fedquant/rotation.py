"""Compositions of 1, 2 or 3 randomized Hadamard transforms over any length d.

the RHT paper ("Quantizing With Randomized Hadamard Transforms: Efficient Heuristic Now
Proven", 2026) (sections 3-7): one RHT leaves sparse or structured inputs far from Gaussian; two
make every coordinate near-Gaussian for any input (Theorems 1-3), three also decorrelate
coordinate blocks for vector quantization (Theorem 6). ``rotations="auto"`` runs the linear
time checks of the RHT paper section 7 on the normalized input u = x / ||x||:

* scalar codecs: 1 RHT if ||u||_3^3 <= 3^(3/4) / sqrt(n), else 2. The threshold is the
  bound of Lemma 1 on E||RHT(u)||_3^3 (rebuilt from its proof: E y_i^4 <= 3 / n^2, then
  Hoelder gives E|y_i|^3 <= 3^(3/4) / n^(3/2)); an input that already passes is as flat
  as the first RHT would make it, so the first RHT is skipped. Gaussian inputs have
  ||u||_3^3 ~ 1.60 / sqrt(n) and pass.
* vector codecs: 2 RHTs if ||u||_4^4 <= 4 / n, else 3. One RHT maps u to y with
  E||y||_4^4 = (3 - 2 ||u||_4^4) / n (the fourth-moment step of Lemma 1); Theorem 6's RMS
  conditional covariance is proportional to that mass, so an input within 4/3 of the
  one-RHT level needs no smoothing RHT. (Gaussian inputs sit at 3 / n.)

On float32 CPU input with numba, :func:`rotate_checked` rotates and runs these checks in
the same pass (the input's moments in the first RHT's first pass: the first layer is the
same whether the check then asks for 1 or 2), and also returns each slice's float64
||x||^2 (= ||z||^2 up to rounding), so that an encoder makes no pass of its own but the
quantizing one.

Any d is split into power-of-two slices (greedy binary decomposition) plus one tail,
padded with zeros to a power of two, once the remainder is at most max(d / 64, 128):
padding then costs under 1.6% of d for every d >= 4096. Each slice is rotated on its own
with signs drawn at its own offset, so the composition is an orthogonal transform of x.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from fedquant import buffers, cpu_kernels, hadamard_numba
from fedquant.hadamard import inverse_rht, rht

SCALAR_L3_CONSTANT = 3.0**0.75
NONFINITE_INPUT = "cannot encode a tensor containing NaN or Inf"
VECTOR_L4_CONSTANT = 4.0


@dataclass(frozen=True)
class Slice:
    """Coordinates [start, start + length) of x, rotated as a block of `size` (power of 2)
    at position `offset` of the padded rotated vector."""

    start: int
    length: int
    offset: int
    size: int


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=256)
def slice_layout(d: int) -> tuple[Slice, ...]:
    """Power-of-two slices covering d coordinates (see module docstring); cached, as
    every encode and decode asks for it several times (the slices are frozen)."""
    if d <= 0:
        return ()
    tail_limit = max(d // 64, 128)
    slices, start, offset = [], 0, 0
    while start < d:
        remaining = d - start
        if remaining <= tail_limit:
            size = _next_pow2(remaining)
            slices.append(Slice(start, remaining, offset, size))
            break
        size = 1 << (remaining.bit_length() - 1)
        slices.append(Slice(start, size, offset, size))
        start += size
        offset += size
    return tuple(slices)


def padded_size(d: int) -> int:
    """Total length of the rotated (padded) vector for d coordinates."""
    return sum(s.size for s in slice_layout(d))


def rotate(x: torch.Tensor, seed: int, rotations: int, backend: str = "auto") -> torch.Tensor:
    """Rotate flat x slice by slice with `rotations` composed RHTs (0 = identity): the
    padded rotated vector, a fresh tensor. Each slice's first RHT writes straight into
    its place in the output and the further ones run in place (no concatenation)."""
    out = buffers.empty_like(x, padded_size(x.numel()))
    for s in slice_layout(x.numel()):
        buf = x[s.start: s.start + s.length]
        if s.size != s.length:
            buf = torch.nn.functional.pad(buf, (0, s.size - s.length))
        dst = out[s.offset: s.offset + s.size]
        if rotations == 0:
            dst.copy_(buf)
        for layer in range(rotations):
            rht(buf, seed, layer, s.offset, backend, out=dst)
            buf = dst
    return out


def unrotate(z: torch.Tensor, seed: int, rotations: int, d: int,
             backend: str = "auto", inplace: bool = False) -> torch.Tensor:
    """Inverse of :func:`rotate`: the d original coordinates from the padded vector z.

    z is left unchanged, unless `inplace`: then every slice is inverted where it lies and
    the result is a view of z's first d entries (the padded tail slice is always last,
    so each slice's offset in z is its start in x)."""
    if inplace:
        for s in slice_layout(d):
            buf = z[s.offset: s.offset + s.size]
            for layer in reversed(range(rotations)):
                inverse_rht(buf, seed, layer, s.offset, backend, out=buf)
        return z[:d]
    out = buffers.empty_like(z, d)
    for s in slice_layout(d):
        buf = z[s.offset: s.offset + s.size]
        dst = out[s.start: s.start + s.size] if s.size == s.length else z.new_empty(s.size)
        if rotations == 0:
            dst.copy_(buf)
        for layer in reversed(range(rotations)):
            inverse_rht(buf, seed, layer, s.offset, backend, out=dst)
            buf = dst
        if s.size != s.length:
            out[s.start: s.start + s.length] = dst[: s.length]
    return out


def flatness(x: torch.Tensor) -> tuple[float, float]:
    """(||u||_3^3, ||u||_4^4) of u = x / ||x||, in one float64 pass."""
    if cpu_kernels.usable(x):  # one fused float64 pass instead of four
        s2, s3, s4 = cpu_kernels.moments(x)
        return (0.0, 0.0) if s2 == 0 else (s3 / s2**1.5, s4 / s2**2)
    u = x.to(torch.float64)
    norm = torch.linalg.vector_norm(u)
    if norm == 0:
        return 0.0, 0.0
    a = (u / norm).abs()
    a2 = a * a
    return float((a2 * a).sum()), float((a2 * a2).sum())


def _check_kind(kind: str) -> None:
    if kind not in ("scalar", "vector"):
        raise ValueError(f"kind must be 'scalar' or 'vector', got {kind!r}")


def flat_enough(kind: str, l3: float, l4: float, size: int) -> bool:
    """The RHT paper section 7's check on one slice of `size` (power of two) with
    (||u||_3^3, ||u||_4^4) = (l3, l4): True if the fewer RHTs suffice."""
    if kind == "scalar":
        return l3 <= SCALAR_L3_CONSTANT / math.sqrt(size)
    return l4 <= VECTOR_L4_CONSTANT / size


def auto_rotations(x: torch.Tensor, kind: str = "scalar") -> int:
    """The number of RHTs the RHT paper's section-7 check asks for (max over slices)."""
    _check_kind(kind)
    need = 1 if kind == "scalar" else 2
    for s in slice_layout(x.numel()):
        l3, l4 = flatness(x[s.start: s.start + s.length])
        if not flat_enough(kind, l3, l4, s.size):
            return need + 1
    return need


def fused_available(x: object) -> bool:
    """Whether :func:`rotate_checked` applies: numba present and x a CPU tensor (any
    floating dtype: the encoders cast it to float32 first)."""
    return hadamard_numba.AVAILABLE and isinstance(x, torch.Tensor) and x.is_cpu


def rotate_checked(x: torch.Tensor, seed: int, rotations: int | str,
                   kind: str = "scalar") -> tuple[torch.Tensor, int, list[float]]:
    """:func:`rotate` for a flat float32 CPU x (numba), with the checks an encoder needs
    taken from the input moments the first RHT sums in its first pass: returns (z, the
    number of RHTs, each slice's float64 ||x||^2, which is ||z||^2 up to float rounding).

    `rotations`: 1..3, or "auto" (:func:`auto_rotations`' check). ValueError
    (NONFINITE_INPUT) if x holds NaN or Inf: the float64 sum of squares of float32
    values is finite exactly when they all are."""
    _check_kind(kind)
    auto = rotations == "auto"
    k = 0 if auto else resolve_rotations(rotations, x, kind)
    if not auto and k == 0:
        raise ValueError("rotate_checked needs at least one rotation (or 'auto')")
    # the input moments the check needs (s2 alone is the NaN / Inf check)
    want = (2 if kind == "scalar" else 3) if auto else 1
    layout = slice_layout(x.numel())
    out = buffers.empty_like(x, padded_size(x.numel()))
    stats = []
    for s in layout:
        buf = x[s.start: s.start + s.length]
        if s.size != s.length:
            buf = torch.nn.functional.pad(buf, (0, s.size - s.length))
        stats.append(hadamard_numba.rht_stats(buf, seed, 0, s.offset, moments=want,
                                              out=out[s.offset: s.offset + s.size])[1])
    if not all(math.isfinite(m[0]) for m in stats):
        raise ValueError(NONFINITE_INPUT)
    if auto:
        k = 1 if kind == "scalar" else 2
        for s, m in zip(layout, stats, strict=True):
            s2 = m[0]
            l3 = m[1] / s2**1.5 if s2 > 0 and kind == "scalar" else 0.0
            l4 = m[2] / s2**2 if s2 > 0 and kind == "vector" else 0.0
            if not flat_enough(kind, l3, l4, s.size):
                k += 1
                break
    for s in layout:
        dst = out[s.offset: s.offset + s.size]
        for layer in range(1, k):
            hadamard_numba.rht(dst, seed, layer, s.offset, out=dst)
    return out, k, [m[0] for m in stats]


def check_rotations(spec: int | str) -> int | None:
    """A codec's `rotations` parameter checked: its count (0..3), or None for "auto";
    ValueError otherwise."""
    if spec == "auto":
        return None
    try:
        k = int(spec)
    except (TypeError, ValueError):
        raise ValueError(f"rotations must be 0, 1, 2, 3 or 'auto', got {spec!r}") from None
    if not 0 <= k <= 3:
        raise ValueError(f"rotations must be 0, 1, 2, 3 or 'auto', got {spec!r}")
    return k


def resolve_rotations(spec: int | str, x: torch.Tensor, kind: str = "scalar") -> int:
    """Turn a codec's `rotations` parameter (0-3 or "auto") into a count for this x."""
    k = check_rotations(spec)
    return auto_rotations(x, kind) if k is None else k
