"""Quantizer models for the learning-under-quantization study (Zhang, Su and Zou, "Learning
under Quantization for High-Dimensional Linear Regression", "Stochastic Error Models").

Zhang, Su and Zou analyses quantized SGD under two error models, both unbiased (E[Q(v)] = v):

* additive (integer-like): Var(Q(v) - v) is bounded by a constant that does not grow with |v|.
  :class:`Additive` is uniform stochastic rounding onto the grid step * Z: v rounds up to the
  next grid point with probability equal to its fractional position. The error variance is
  p (1 - p) step^2 <= step^2 / 4 (mean step^2 / 6 over positions), whatever |v| is.
* multiplicative (floating-point-like): Var(Q(v) - v) is proportional to v^2.
  :class:`Multiplicative` is stochastic rounding onto a float format with `mantissa_bits`
  explicit mantissa bits (no exponent limits): v in [2^e, 2^(e+1)) rounds stochastically to a
  multiple of 2^(e - mantissa_bits), so the error variance is at most
  v^2 * 4^-mantissa_bits / 4.

Both take an explicit ``torch.Generator`` (simulation noise, not a wire contract) and work
on the input's device. :class:`Exact` is the full-precision identity.

Example::

    q = Additive(step=0.05)
    x_q = q(x, generator)
"""

from __future__ import annotations

import torch

MODELS = ("additive", "multiplicative")


def _stochastic_round(scaled: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Round each entry to floor or ceil, up with probability equal to its fractional part."""
    low = torch.floor(scaled)
    u = torch.rand(scaled.shape, generator=generator, device=scaled.device, dtype=scaled.dtype)
    return low + (u < scaled - low).to(scaled.dtype)


class Exact:
    """No quantization (the full-precision reference)."""

    __slots__ = ()
    model = "none"

    def __call__(self, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return v

    def __repr__(self) -> str:
        return "Exact()"


class Additive:
    """Uniform stochastic rounding with a fixed step (error variance <= step^2 / 4)."""

    __slots__ = ("step",)
    model = "additive"

    def __init__(self, step: float):
        if not step > 0:
            raise ValueError(f"additive step must be > 0, got {step!r}")
        self.step = float(step)

    def __call__(self, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return _stochastic_round(v / self.step, generator) * self.step

    def __repr__(self) -> str:
        return f"Additive(step={self.step})"


class Multiplicative:
    """Stochastic rounding to a float format with `mantissa_bits` mantissa bits."""

    __slots__ = ("mantissa_bits",)
    model = "multiplicative"

    def __init__(self, mantissa_bits: int):
        if not isinstance(mantissa_bits, int) or not 0 <= mantissa_bits <= 20:
            raise ValueError(f"mantissa_bits must be an int in 0..20, got {mantissa_bits!r}")
        self.mantissa_bits = mantissa_bits

    def __call__(self, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # frexp: v = m * 2^e with |m| in [0.5, 1); the grid spacing in [2^(e-1), 2^e) is
        # 2^(e - 1 - mantissa_bits). Zero stays zero (frexp gives e = 0, spacing irrelevant).
        _, exponent = torch.frexp(v)
        spacing = torch.ldexp(torch.ones_like(v), exponent - 1 - self.mantissa_bits)
        return _stochastic_round(v / spacing, generator) * spacing

    def __repr__(self) -> str:
        return f"Multiplicative(mantissa_bits={self.mantissa_bits})"


def make_quantizer(model: str, step: float, mantissa_bits: int) -> Additive | Multiplicative:
    """The quantizer of `model` ("additive" or "multiplicative") with its one parameter."""
    if model == "additive":
        return Additive(step)
    if model == "multiplicative":
        return Multiplicative(mantissa_bits)
    raise ValueError(f"quantizer model must be one of {MODELS}, got {model!r}")
