"""Numba CPU kernel for the RHT (placeholder being replaced by the blocked kernel).

Contract (see fedquant.hadamard): ``rht(x, seed, layer, offset)`` returns H D x / sqrt(n)
for a 1-D float32 CPU tensor of power-of-two length, with the sign of position i the top
bit of ``hash64(seed, Purpose.ROTATION, (layer << 40) + offset + i)``;
``inverse_rht(y, ...)`` returns D H y / sqrt(n).
"""

from __future__ import annotations

AVAILABLE = False
