"""Recompute the Gaussian vector-quantization codebooks shipped in vq_codebooks.npz.

For each supported block dimension k and bits per coordinate b (k * b <= 8, so a block's
index fits one byte: k = 2 with b = 1..4, k = 4 with b = 1, 2, k = 8 with b = 1), the
codebook holds 2^(k*b) centroids in R^k that minimize E ||Z - c(Z)||^2 for Z ~ N(0, I_k):
k-means (Lloyd's iteration) on Gaussian samples, as the RHT paper section 6.3 prescribes ("the
optimal codebook is derived via k-means clustering over this distribution").

Everything is seeded: the training samples are ``fedquant.random.normals`` of a fixed seed
(bit-reproducible on any platform), the initial centroids come from k-means++ seeding driven
by the same generator, and Lloyd runs a fixed number of rounds. The distortion per
coordinate, measured on fresh samples, is stored next to each codebook. Used by
``fedquant/codecs/vq.py``.

    python -m fedquant.data.make_vq_codebooks
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

from fedquant import random as fqr

OUT = pathlib.Path(__file__).with_name("vq_codebooks.npz")
SUPPORTED = ((2, 1), (2, 2), (2, 3), (2, 4), (4, 1), (4, 2), (8, 1))
SEED = 20240603
TRAIN = 2**18  # training samples (at least 1024 per centroid)
ROUNDS = 40
CHUNK = 2**13  # points per distance block (a block of distances stays in cache)


def gaussian_samples(n: int, k: int, seed: int) -> torch.Tensor:
    """n samples of N(0, I_k), float64, from the counter-based generator."""
    return fqr.normals(seed, fqr.Purpose.PRIVATE, n * k).to(torch.float64).view(n, k)


def assign(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid index of each point, in chunks to bound memory."""
    c32 = centroids.to(torch.float32)
    sq = (c32 * c32).sum(1)
    p32 = points.to(torch.float32)
    out = torch.empty(points.shape[0], dtype=torch.int64)
    for i in range(0, points.shape[0], CHUNK):
        out[i: i + CHUNK] = torch.addmm(sq, p32[i: i + CHUNK], c32.T, alpha=-2).argmin(1)
    return out


def distortion(points: torch.Tensor, centroids: torch.Tensor) -> float:
    """Mean squared error per coordinate of nearest-centroid quantization."""
    err = points - centroids[assign(points, centroids)]
    return float((err * err).sum() / points.numel())


def spread_init(points: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) on a pool of points, with uniforms from the
    counter-based generator so the result is reproducible everywhere."""
    pool = points[: 64 * m]
    u = fqr.uniforms64(seed, fqr.Purpose.DITHER, m)
    chosen = [0]
    best = ((pool - pool[0]) ** 2).sum(1)
    for j in range(1, m):
        cum = torch.cumsum(best, 0)
        idx = min(int(torch.searchsorted(cum, cum[-1] * u[j])), pool.shape[0] - 1)
        chosen.append(idx)
        best = torch.minimum(best, ((pool - pool[idx]) ** 2).sum(1))
    return pool[chosen].clone()


def lloyd(points: torch.Tensor, m: int, seed: int, rounds: int = ROUNDS) -> torch.Tensor:
    """m centroids by Lloyd's iteration (an empty cell keeps its centroid)."""
    c = spread_init(points, m, seed)
    k = points.shape[1]
    for _ in range(rounds):
        idx = assign(points, c)
        sums = torch.zeros(m, k, dtype=points.dtype).index_add_(0, idx, points)
        counts = torch.bincount(idx, minlength=m).to(points.dtype)
        filled = counts > 0
        c[filled] = sums[filled] / counts[filled, None]
    return c


def main() -> None:
    torch.set_num_threads(1)  # many tiny ops: spinning worker threads only slow them down
    arrays = {}
    for k, b in SUPPORTED:
        m = 2 ** (k * b)
        train = gaussian_samples(TRAIN, k, SEED + 100 * k + b)
        c = lloyd(train, m, SEED + 100 * k + b)
        test = gaussian_samples(TRAIN, k, SEED + 100 * k + b + 50)
        d = distortion(test, c)
        arrays[f"k{k}_b{b}"] = c.to(torch.float32).numpy()
        arrays[f"k{k}_b{b}_mse"] = np.array(d, dtype=np.float32)
        print(f"k={k} b={b}: {m} centroids, distortion per coordinate {d:.5f}")
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
