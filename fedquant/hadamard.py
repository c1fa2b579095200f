"""Randomized Hadamard transforms of one power-of-two slice: RHT = H D / sqrt(n).

Two kernels give the same numbers to float tolerance:

* the torch kernel below (any device: CUDA, MPS, CPU), a reshape-butterfly FWHT;
* the numba CPU kernel in :mod:`fedquant.hadamard_numba` (blocked, in-cache butterflies,
  signs hashed inside the kernel), used automatically for float32 CPU tensors.

The sign diagonal of composed layer ``layer`` at global position ``offset + i`` is the top
bit of ``hash64(seed, Purpose.ROTATION, (layer << 40) + offset + i)``
(``fedquant.random.rotation_sign_index``).
"""

from __future__ import annotations

import math

import torch

from fedquant import hadamard_numba
from fedquant import random as fqr


def fwht_torch(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform H x / sqrt(n) of a 1-D power-of-two tensor."""
    n = x.numel()
    if n & (n - 1):
        raise ValueError(f"FWHT length must be a power of two, got {n}")
    y = x.reshape(-1).clone()
    h = 1
    while h < n:
        y = y.view(-1, 2, h)
        a, b = y[:, 0, :], y[:, 1, :]
        y = torch.stack((a + b, a - b), dim=1)
        h *= 2
    return y.reshape(-1) / math.sqrt(n)


def _signs(seed: int, layer: int, offset: int, n: int, device: torch.device) -> torch.Tensor:
    return fqr.signs(seed, fqr.Purpose.ROTATION, n, device=device,
                     start=fqr.rotation_sign_index(layer, offset))


def _use_numba(x: torch.Tensor) -> bool:
    return hadamard_numba.AVAILABLE and x.dtype == torch.float32 and x.is_cpu


def _into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return result
    return out.copy_(result)


def rht(x: torch.Tensor, seed: int, layer: int, offset: int = 0, backend: str = "auto",
        out: torch.Tensor | None = None) -> torch.Tensor:
    """One RHT layer: H D x / sqrt(n), for a 1-D power-of-two slice; written into `out`
    when given (`out` may be x itself)."""
    if backend == "numba" or (backend == "auto" and _use_numba(x)):
        return hadamard_numba.rht(x, seed, layer, offset, out=out)
    return _into(fwht_torch(x * _signs(seed, layer, offset, x.numel(), x.device)), out)


def inverse_rht(y: torch.Tensor, seed: int, layer: int, offset: int = 0,
                backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`rht`: D H y / sqrt(n) (H / sqrt(n) is its own inverse)."""
    if backend == "numba" or (backend == "auto" and _use_numba(y)):
        return hadamard_numba.inverse_rht(y, seed, layer, offset, out=out)
    return _into(fwht_torch(y) * _signs(seed, layer, offset, y.numel(), y.device), out)
