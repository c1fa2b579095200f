"""Recompute QUIC-FL's sender and receiver tables shipped in quicfl_tables.npz.

QUIC-FL (the RHT paper ("Quantizing With Randomized Hadamard Transforms: Efficient Heuristic Now
Proven", 2026) section 5; Ben-Basat et al., ICML 2024, section 3) quantizes a scaled
rotated coordinate z in [-T, T] to one of 2^b messages X, using a private index h in
{0, .., 2^l - 1} that the receiver regenerates from the client's seed. The receiver
outputs R[X, h]. The design problem, for z ~ N(0, 1) restricted to [-T, T], is

    minimize   E_z E_h E_X (R[X, h] - z)^2
    subject to E_h E_X R[X, h] = z              for every z in [-T, T],

over the receiver table R and the sender probabilities P(X | z, h). Unbiasedness is only
required on average over h (a sender may be biased for a given h), which is what lets
shared randomness beat plain stochastic rounding.

How we solve it (our construction; the paper's formulas were lost in the seed text):

* z lives on a grid a_0 < .. < a_{m-1} of m points spanning [-T, T]. At encode time a
  coordinate z between a_i and a_{i+1} is first stochastically rounded to one of them
  (unbiased by design), then sent with the grid point's probabilities. So unbiasedness on
  the grid gives unbiasedness for every z, and the rounding adds (a_{i+1} - z)(z - a_i)
  <= (spacing / 2)^2 to the variance (uncorrelated with the rest, because the sender is
  unbiased at each grid point).
* For a fixed R, the optimal sender at one grid point a is a linear program over
  P(X | a, h): linear cost sum_h sum_X P (R - a)^2, one unbiasedness equation and a
  simplex per h. Its Lagrangian with multiplier mu for the equation is minimized by letting
  every h send the X whose R[X, h] is nearest to the shifted target t = a + mu / 2
  (because (r - a)^2 - mu (r - a) = (r - t)^2 - mu^2 / 4). The mean over h of those
  nearest values is a non-decreasing step function of t; the optimal t is where it crosses
  a, and at that step exactly one h randomizes between its two neighbouring values with
  the probability that makes the mean equal a. This is an exact LP solution (strong
  duality), computed for all grid points at once with one sort and one searchsorted.
* The optimization is then over R only: F(R) = sum_i w_i D_i(R), D_i the LP optimum at
  a_i, w_i the Gaussian mass of grid point i. By the envelope theorem
  dF / dR[X, h] = sum_i w_i (2 / H) P(X | a_i, h) (R[X, h] - t_i), which we hand to
  L-BFGS (scipy), from staggered uniform starts; the columns of R are kept sorted.
  Infeasible R (mean-over-h range not covering [-T, T]) is priced by a quadratic penalty
  and repaired at the end by a scaling that makes the range cover [-T, T].

The sender table ships as, per grid point i and index h, the lower message lo[i, h] and
the probability up[i, h] of sending lo + 1 instead (R columns sorted ascending).
``expected_vnmse`` is the design vNMSE: the integral over |z| <= T of the variance,
with the Gaussian density (coordinates beyond T are sent exactly and cost nothing).

Checked: the shipped tables are unbiased to about 1e-15 at every grid point, hence (by the
linear interpolation) for every z (tests/test_quicfl.py evaluates E[R | z] = z to 1e-6 with
the codec's own sampling rule). Design vNMSE at p = 2^-9 (REFERENCE.md in brackets):
l = 6/5/4/4: 1.4751 (1.467), 0.2139 (0.2149), 0.04267 (0.0431), 0.00954 (0.00968);
l = 0: 8.597 (8.60), 0.574 (0.573), 0.0927 (0.093), 0.01949 (0.0195). About two minutes.

    python -m fedquant.data.make_quicfl_tables
"""

from __future__ import annotations

import pathlib
import time

import numpy as np
from scipy.optimize import minimize
from scipy.stats import norm

OUT = pathlib.Path(__file__).with_name("quicfl_tables.npz")
P_DEFAULT = 2.0**-9
DEFAULT_SHARED_BITS = {1: 6, 2: 5, 3: 4, 4: 4}
GRID_POINTS = 801
PENALTY = 1e3


def threshold(p: float) -> float:
    """T_p with 2 (1 - Phi(T_p)) = p: the bounded-support threshold."""
    return float(norm.isf(p / 2))


def grid(t: float, m: int = GRID_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Grid points a_i on [-T, T] and their weights w_i = integral of phi times the hat
    function of a_i (the probability that z is rounded to a_i)."""
    a = np.linspace(-t, t, m)
    delta = a[1] - a[0]
    # exact integral of phi(z) * hat_i(z) over the two neighbouring cells
    cdf, pdf = norm.cdf(a), norm.pdf(a)
    # integral_{a_{i-1}}^{a_i} phi(z) (z - a_{i-1}) / delta dz, and the mirrored right part
    left = np.zeros(m)
    right = np.zeros(m)
    # int phi(z) z dz = -phi(z)
    seg_mass = cdf[1:] - cdf[:-1]
    seg_first = -(pdf[1:] - pdf[:-1])  # int_{a_j}^{a_{j+1}} z phi(z) dz
    left[1:] = (seg_first - a[:-1] * seg_mass) / delta
    right[:-1] = (a[1:] * seg_mass - seg_first) / delta
    return a, left + right


def sender(r: np.ndarray, a: np.ndarray):
    """Optimal sender for receiver table r (X x H, columns sorted ascending) at points a.

    Returns (lo, up, target, feasible): lo[i, h] the lower message, up[i, h] the
    probability of lo + 1, target t_i, and feasible[i] whether the mean-over-h range covers
    a_i (outside it every h sends its extreme message).
    """
    n_msg, n_h = r.shape
    mids = (r[1:] + r[:-1]) / 2  # (X-1, H) breakpoints
    steps = (r[1:] - r[:-1]) / n_h
    flat = mids.ravel()
    order = np.argsort(flat, kind="stable")
    bx, bh = np.unravel_index(order, mids.shape)
    m0 = r[0].mean()
    m_right = m0 + np.cumsum(steps.ravel()[order])  # mean after passing breakpoint k
    k = np.searchsorted(m_right, a, side="left")  # first k with m_right[k] >= a
    n_bp = flat.size
    feasible = (a >= m0) & (k < n_bp)
    kc = np.clip(k, 0, n_bp - 1)
    m_left = np.where(kc > 0, m_right[np.maximum(kc - 1, 0)], m0)
    with np.errstate(invalid="ignore", divide="ignore"):
        lam = np.clip((a - m_left) / (m_right[kc] - m_left), 0.0, 1.0)
    # passed[k, h] = number of breakpoints of column h strictly before sorted position k
    onehot = np.zeros((n_bp + 1, n_h), dtype=np.int64)
    onehot[np.arange(1, n_bp + 1), bh] = 1
    passed = np.cumsum(onehot, axis=0)
    lo = passed[kc].copy()
    up = np.zeros(lo.shape)
    rows = np.arange(a.size)
    up[rows, bh[kc]] = lam
    lo[rows, bh[kc]] = bx[kc]
    target = flat[order][kc]
    # infeasible points: all lowest (a below range) or all highest (a above range)
    below, above = a < m0, (k >= n_bp) & ~(a < m0)
    lo[below], up[below] = 0, 0.0
    lo[above], up[above] = n_msg - 2, 1.0
    target = np.where(below, r[0].min(), np.where(above, r[-1].max(), target))
    return lo, up, target, feasible


def mean_and_cost(r: np.ndarray, a: np.ndarray, lo: np.ndarray, up: np.ndarray):
    """E_h E_X R and E_h E_X (R - a)^2 at each grid point for a sender (lo, up)."""
    n_h = r.shape[1]
    cols = np.arange(n_h)
    r_lo, r_hi = r[lo, cols], r[np.minimum(lo + 1, r.shape[0] - 1), cols]
    mean = ((1 - up) * r_lo + up * r_hi).mean(axis=1)
    cost = ((1 - up) * (r_lo - a[:, None]) ** 2 + up * (r_hi - a[:, None]) ** 2).mean(axis=1)
    return mean, cost


def objective(flat_r: np.ndarray, shape, a, w):
    """F(R) plus the infeasibility penalty, and its gradient (envelope theorem)."""
    r = flat_r.reshape(shape)
    order = np.argsort(r, axis=0)
    rs = np.take_along_axis(r, order, axis=0)
    lo, up, target, _ = sender(rs, a)
    mean, cost = mean_and_cost(rs, a, lo, up)
    n_msg, n_h = shape
    gap = mean - a
    value = float(np.sum(w * cost) + PENALTY * np.sum(w * gap**2))
    grad = np.zeros(shape)
    cols = np.broadcast_to(np.arange(n_h), lo.shape)
    hi = np.minimum(lo + 1, n_msg - 1)
    # d cost / dR = (2/H) P (R - a); the LP multiplier turns (R - a) into (R - t) where the
    # constraint binds, and the penalty adds 2 * PENALTY * gap * P / H where it does not.
    base = np.where(np.abs(gap) > 1e-12, a, target)
    for idx, prob in ((lo, 1 - up), (hi, up)):
        rv = rs[idx, cols]
        g = (2.0 / n_h) * prob * (rv - base[:, None] + PENALTY * gap[:, None])
        np.add.at(grad, (idx, cols), w[:, None] * g)
    out = np.empty(shape)
    np.put_along_axis(out, order, grad, axis=0)
    return value, out.ravel()


def initial_table(bits: int, shared_bits: int, t: float, spread: float, rng) -> np.ndarray:
    """Staggered uniform quantizers: column h is a uniform grid shifted by h / H of a step."""
    n_msg, n_h = 2**bits, 2**shared_bits
    step = spread * 2 * t / max(n_msg - 1, 1)
    shifts = (np.arange(n_h) + 0.5) / n_h - 0.5
    base = (np.arange(n_msg) - (n_msg - 1) / 2) * step
    r = base[:, None] + shifts[None, :] * step
    return r + rng.normal(0, 0.01 * step, r.shape)


def repair(r: np.ndarray, t: float) -> np.ndarray:
    """Scale R so that the mean-over-h range covers [-T, T] (makes every a feasible)."""
    lo_mean, hi_mean = r[0].mean(), r[-1].mean()
    s = max(1.0, -t / lo_mean if lo_mean < 0 else np.inf, t / hi_mean if hi_mean > 0 else np.inf)
    return r * (s * (1 + 1e-12))


def design_vnmse(r: np.ndarray, a: np.ndarray, lo: np.ndarray, up: np.ndarray) -> float:
    """Design vNMSE: integral over [-T, T] of phi(z) E (R - z)^2, grid rounding included.

    With J the grid point z is rounded to, E (R - z)^2 = E (R - a_J)^2 + E (a_J - z)^2
    (the cross term vanishes: the sender is unbiased at every grid point).
    """
    _, cost = mean_and_cost(r, a, lo, up)
    delta = a[1] - a[0]
    z = np.linspace(a[0], a[-1], 20 * (a.size - 1) + 1)
    pos = (z - a[0]) / delta
    i = np.clip(np.floor(pos).astype(int), 0, a.size - 2)
    frac = pos - i
    var = (1 - frac) * cost[i] + frac * cost[i + 1] + frac * (1 - frac) * delta**2
    return float(np.trapezoid(norm.pdf(z) * var, z))


def solve(bits: int, shared_bits: int, p: float = P_DEFAULT, m: int = GRID_POINTS,
          restarts: int = 4, seed: int = 0, verbose: bool = True) -> dict:
    """Solve the tables for (b, l, p); returns arrays ready to ship."""
    t = threshold(p)
    a, w = grid(t, m)
    rng = np.random.default_rng(seed + 100 * bits + shared_bits)
    shape = (2**bits, 2**shared_bits)
    best = None
    spreads = np.linspace(1.0, 1.6, restarts) if shared_bits else [1.0]
    for spread in spreads:
        r0 = initial_table(bits, shared_bits, t, spread, rng)
        if shared_bits == 0:
            r0 = np.sort(r0, axis=0)
        res = minimize(objective, r0.ravel(), args=(shape, a, w), jac=True,
                       method="L-BFGS-B", options={"maxiter": 3000, "maxcor": 30})
        r = repair(np.sort(res.x.reshape(shape), axis=0), t)
        lo, up, _, feasible = sender(r, a)
        v = design_vnmse(r, a, lo, up)
        if verbose:
            print(f"  b={bits} l={shared_bits} spread={spread:.2f}: vNMSE {v:.5f} "
                  f"({res.nit} iters, feasible={feasible.all()})")
        if best is None or v < best[0]:
            best = (v, r, lo, up)
    v, r, lo, up = best
    return {"receiver": r, "lo": lo.astype(np.uint8), "up": up, "grid": a,
            "vnmse": v, "threshold": t, "p": p}


def main() -> None:
    arrays = {}
    for bits, default_l in DEFAULT_SHARED_BITS.items():
        for shared_bits in range(default_l + 1):
            start = time.time()
            sol = solve(bits, shared_bits)
            key = f"b{bits}_l{shared_bits}"
            print(f"{key}: vNMSE {sol['vnmse']:.5f} in {time.time() - start:.1f} s")
            for name in ("receiver", "lo", "up", "grid"):
                arrays[f"{key}_{name}"] = sol[name]
            arrays[f"{key}_vnmse"] = np.float64(sol["vnmse"])
    arrays["p"] = np.float64(P_DEFAULT)
    arrays["threshold"] = np.float64(threshold(P_DEFAULT))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
