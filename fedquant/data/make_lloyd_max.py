"""Recompute the Lloyd-Max quantizers of N(0, 1) shipped in lloyd_max.json.

For b = 1..8 bits: 2^b centroids that minimize E (Z - c(Z))^2 for Z ~ N(0, 1), by Lloyd's
iteration on the exact density (boundaries = midpoints; centroid of [a, b] =
(phi(a) - phi(b)) / (Phi(b) - Phi(a))), run to a fixed point. Used by EDEN / DRIVE
(the RHT paper ("Quantizing With Randomized Hadamard Transforms: Efficient Heuristic Now
Proven", 2026) section 4; EDEN's biased and unbiased variants both quantize to these centroids).

    python -m fedquant.data.make_lloyd_max
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from scipy.stats import norm

OUT = pathlib.Path(__file__).with_name("lloyd_max.json")


def lloyd_max(bits: int, iters: int = 20000, tol: float = 1e-13) -> np.ndarray:
    k = 2**bits
    c = norm.ppf((np.arange(k) + 0.5) / k)  # start at the quantiles
    for _ in range(iters):
        edges = np.concatenate(([-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]))
        mass = np.diff(norm.cdf(edges))
        new = (norm.pdf(edges[:-1]) - norm.pdf(edges[1:])) / mass
        new = (new - new[::-1]) / 2  # keep exact symmetry
        if np.max(np.abs(new - c)) < tol:
            return new
        c = new
    return c


def mse(c: np.ndarray) -> float:
    edges = np.concatenate(([-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]))
    mass = np.diff(norm.cdf(edges))
    # E Z^2 - sum_j mass_j c_j^2 (centroid condition)
    return float(1.0 - np.sum(mass * c * c))


def main() -> None:
    table = {}
    for b in range(1, 9):
        c = lloyd_max(b)
        table[str(b)] = {"centroids": c.tolist(), "mse": mse(c)}
        print(f"b={b}: mse={mse(c):.6f}")
    OUT.write_text(json.dumps(table, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
