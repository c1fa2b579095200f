"""Error metrics of distributed mean estimation.

* vNMSE (one client): ||x_hat - x||^2 / ||x||^2.
* NMSE (n clients): ||mean_hat - mean(x_i)||^2 / ((1/n) sum_i ||x_i||^2); for unbiased
  codecs with independent randomness it is about vNMSE / n.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def vnmse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Normalized squared error of one reconstruction (float64 arithmetic)."""
    x64, h64 = x.detach().to(torch.float64).reshape(-1), x_hat.detach().to(torch.float64)
    denom = float(torch.dot(x64, x64))
    if denom == 0:
        raise ValueError("vnmse is undefined for a zero vector")
    diff = h64.reshape(-1).to(x64.device) - x64
    return float(torch.dot(diff, diff)) / denom


def nmse(xs: Sequence[torch.Tensor], mean_hat: torch.Tensor) -> float:
    """Normalized squared error of an estimate of the mean of xs."""
    if len(xs) == 0:
        raise ValueError("nmse needs at least one vector")
    stack = [x.detach().to(torch.float64).reshape(-1) for x in xs]
    true_mean = sum(stack) / len(stack)
    energy = sum(float(torch.dot(x, x)) for x in stack) / len(stack)
    if energy == 0:
        raise ValueError("nmse is undefined for all-zero vectors")
    diff = mean_hat.detach().to(torch.float64).reshape(-1).to(true_mean.device) - true_mean
    return float(torch.dot(diff, diff)) / energy
