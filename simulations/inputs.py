"""Test vectors for distributed mean estimation: natural and adversarial inputs.

``make_input(name, d, seed)`` returns a float32 vector of length d:

* ``normal``: i.i.d. N(0, 1), already "rotated-looking"; the RHTs change nothing.
* ``lognormal``: i.i.d. LogNormal(0, 1), skewed with a large mean, a typical gradient-like
  stress test (REFERENCE.md, "Biased vs unbiased once averaged").
* ``onehot``: a single 1 at a random position: one RHT flattens it perfectly, but its
  cubed l3 mass is maximal, so ``rotations="auto"`` asks for two.
* ``two-spikes``: two equal entries (1, 1) at random distinct positions of the first
  power-of-two slice (so that one RHT sees both): H D x then has half its coordinates exactly
  zero, and one RHT fails (EDEN b = 1 vNMSE about 1.0 instead of 0.571; the RHT paper).
* ``digits-grad``: real minibatch gradients of an MLP on scikit-learn's bundled digits
  (simulations.gradients): structured, heavy-tailed, with many exact zeros.
* ``block8``: a block of 8 equal entries (1) at random distinct positions of the first
  power-of-two slice, the rest zero. After one RHT each coordinate is a sum of 8 random
  signs over sqrt(d), so EDEN b = 1 gets 8 / E|S_8|^2 - 1 = 0.672 (E|S_8| = 35/16),
  REFERENCE.md's "block of 8 equal entries" row (0.664). A *contiguous* block is worse and
  heavy-tailed over the sign draws (an aligned one averages exactly 1.015 by enumerating
  the 256 sign patterns of H_8), so it would need far more trials to measure.

Inputs are generated with ``torch.Generator`` seeded by ``seed``: they are experiment data,
not part of the wire contract.
"""

from __future__ import annotations

import torch

from fedquant.simulations.gradients import digits_gradient

INPUTS = ("normal", "lognormal", "digits-grad", "onehot", "two-spikes", "block8", "similar")
#: the common vector of the "similar" clients (one for every round and seed)
_SIMILAR_BASE_SEED = 0x5EED_C0DE


def _first_slice(d: int) -> int:
    """Length of the first power-of-two slice of d (rotation.slice_layout, for d > 128)."""
    return 1 << (d.bit_length() - 1)


def make_input(name: str, d: int, seed: int) -> torch.Tensor:
    """The input vector `name` of length d (float32, CPU), reproducible from seed."""
    if name not in INPUTS:
        raise ValueError(f"unknown input {name!r}; allowed: {list(INPUTS)}")
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be a positive integer, got {d!r}")
    if name == "two-spikes" and d < 2 or name == "block8" and d < 8:
        raise ValueError(f"input {name!r} needs d >= {2 if name == 'two-spikes' else 8}")
    if name == "digits-grad":
        return digits_gradient(d, int(seed))
    g = torch.Generator().manual_seed(int(seed) % 2**63)
    if name == "normal":
        return torch.randn(d, generator=g)
    if name == "lognormal":
        return torch.randn(d, generator=g).exp()
    if name == "similar":  # one common N(0,1) vector plus this client's 10% of noise
        base = torch.randn(d, generator=torch.Generator().manual_seed(_SIMILAR_BASE_SEED))
        return base + 0.1 * torch.randn(d, generator=g)
    x = torch.zeros(d)
    n = _first_slice(d)
    if name == "onehot":
        x[int(torch.randint(d, (1,), generator=g))] = 1.0
    elif name == "two-spikes":
        x[torch.randperm(n, generator=g)[:2]] = 1.0
    else:
        x[torch.randperm(n, generator=g)[:8]] = 1.0
    return x


__all__ = ["INPUTS", "make_input"]
