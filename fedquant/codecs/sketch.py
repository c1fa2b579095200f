"""Random Gaussian projection sketch from the shared seed, decoded with the transpose.

The inner-product quantization notes after Ordentlich and Polyanskiy (2024), section 3
("Failure of sketching"): the sender sends y = S x for an m x d matrix S
of i.i.d. N(0, 1) entries that the receiver regenerates from the shared seed
(``fedquant.random.normals``, ``Purpose.SKETCH``, entry (i, j) at counter i * d + j); the
receiver returns x_hat = S^T y / m. Since E[S^T S] = m I, the estimate is unbiased, but
E||x_hat - x||^2 = (d + 1) / m * ||x||^2: a sketch needs m comparable to d to be useful,
which is the point the seed makes. (The seed's Proposition 2 formula was lost in conversion;
this vector form is rebuilt from one row s: E[(s.x)^2 ||s||^2] = (d + 2) ||x||^2, so each
row contributes (d + 1) ||x||^2 of variance; tests/test_baselines.py measures it.)

S is generated in row chunks of at most _CHUNK_ENTRIES entries, so memory stays O(d + m)
beyond one chunk; m * d is capped at MAX_ENTRIES (ValueError when encoding, WireError when
parsing) because the work grows with it. y travels as float32.

Example::

    enc = fq.get_codec("sketch", ratio=0.25).encode(grad, seed=3)
"""

from __future__ import annotations

import torch

from fedquant import random as fqr
from fedquant.codecs.base import (
    Codec,
    all_finite,
    check_input,
    check_seed,
    expect_section,
    register_codec,
)
from fedquant.wire import Encoded, Section, WireError

MAX_ENTRIES = 2**28
_CHUNK_ENTRIES = 2**22


def sketch_rows(d: int, ratio: float) -> int:
    """m = round(ratio * d), at least 1 (0 for an empty vector)."""
    return 0 if d == 0 else max(1, round(ratio * d))


def _row_blocks(seed: int, m: int, d: int, device):
    """(first row, rows of S) chunks covering S."""
    step = max(1, _CHUNK_ENTRIES // max(d, 1))
    for r0 in range(0, m, step):
        rows = min(step, m - r0)
        yield r0, fqr.normals(seed, fqr.Purpose.SKETCH, rows * d, device, start=r0 * d).view(
            rows, d)


@register_codec
class GaussianSketch(Codec):
    """Gaussian projection sketch (Ordentlich and Polyanskiy section 3), unbiased.

    Args:
        ratio (float, default 0.1): rows m of the sketch as a share of d (m = ratio * d).
    """

    name = "sketch"
    unbiased = True

    def __init__(self, ratio: float = 0.1):
        if not isinstance(ratio, float | int) or not 0 < ratio <= 64:
            raise ValueError(f"ratio must be in (0, 64], got {ratio!r}")
        self.ratio = float(ratio)

    def _rows(self, d: int, error=ValueError) -> int:
        m = sketch_rows(d, self.ratio)
        if m * d > MAX_ENTRIES:
            raise error(f"sketch of {m} x {d} = {m * d} entries exceeds the cap {MAX_ENTRIES}; "
                        f"lower ratio (now {self.ratio}) or split the tensor")
        return m

    def encode(self, x: torch.Tensor, seed: int = 0) -> Encoded:
        flat = check_input(x)
        d, m = flat.numel(), self._rows(flat.numel())
        y = torch.empty(m, dtype=torch.float32, device=flat.device)
        for r0, rows in _row_blocks(check_seed(seed), m, d, flat.device):
            y[r0: r0 + rows.shape[0]] = rows @ flat
        if not all_finite(y):
            raise ValueError("sketch: the input is too large to encode: its projection "
                             "passes float32's range")
        return self._new_encoded(x, seed, sections={"y": Section.from_raw("y", y)})

    def validate(self, enc: Encoded) -> None:
        expect_section(enc, "y", self._rows(enc.numel, WireError), 32)

    def decode(self, enc: Encoded, device=None) -> torch.Tensor:
        y = enc.section("y").raw("float", device)
        d, m = enc.numel, y.numel()
        out = torch.zeros(d, dtype=torch.float32, device=y.device)
        for r0, rows in _row_blocks(enc.seed, m, d, y.device):
            out += rows.T @ y[r0: r0 + rows.shape[0]]
        return out / max(m, 1)
