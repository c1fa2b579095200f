"""Post-training quantization of a trained MLP: SPFQ, with GPFQ and MSQ baselines.

SPFQ (Zhang and Saab, "SPFQ: A Stochastic Algorithm and Its Error Analysis for Neural
Network Quantization", https://arxiv.org/abs/2309.10975). A layer's weights W (N_in x N_out,
neurons as columns, the bias appended as an extra row fed by a constant-1 input, as SPFQ
section 2.1 suggests) are quantized to a mid-tread alphabet {k delta : |k| <= K} so that
the quantized network's activations X~ times the quantized weights track the original
network's activations X times W, on a calibration batch of m inputs:

* Phase I, data alignment (find w~ with X~ w~ ~ X w):
  - ``alignment="approximate"``: order-r alignment, eq (13) for the first pass over the
    inputs and eq (20) for passes 2..r (Gauss-Seidel sweeps on ||X w - X~ w~||);
  - ``alignment="perfect"``: min ||w~||_inf s.t. X~ w~ = X w, eq (18), as a linear program
    solved by ``scipy.optimize.linprog`` (HiGHS).
* Phase II, eq (15): the stochastic path-following quantizer Q_StocQ (eq 6) walks t = 1..N_in,
  each time rounding w~_t plus the projection of the running error onto X~_t.

``method="gpfq"`` is eq (85): the same path with the deterministic nearest-point quantizer
(by SPFQ (Zhang and Saab) Prop. 2.1, that path equals alignment of order 1 followed by phase II).
``method="msq"`` rounds every weight to its nearest alphabet point.

The alphabet step is eq (86): delta = C / (2^(b-1) N_out) * sum_j ||W_j||_inf. Eq (86) pairs
it with K = 2^(b-1), i.e. 2^b + 1 levels, one too many for b bits; we keep K = 2^(b-1) - 1 so
that every weight is exactly b bits on the wire (the 2^b - 1 levels of a symmetric b-bit
grid), and count sizes from the actually packed bytes.

Example::

    q_model, nbytes = quantize_model(model, calib_x, bits=4, method="spfq")
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linprog
from torch import nn

from fedquant.packing import pack
from fedquant.random import Purpose, hash64, uniforms64

METHODS = ("spfq", "gpfq", "msq")
ALIGNMENTS = ("approximate", "perfect")


@dataclass(frozen=True)
class Alphabet:
    """The mid-tread alphabet {k * step : -levels <= k <= levels} (SPFQ (Zhang and Saab) eq 5)."""

    step: float
    levels: int

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(2 * self.levels + 1)))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Q_DetQ: the nearest alphabet point, as the integer k."""
        return torch.round(z / self.step).clamp_(-self.levels, self.levels)

    def stochastic(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Q_StocQ (eq 6): round z / step up with probability frac(z / step), then clip."""
        t = z / self.step
        low = torch.floor(t)
        return (low + (u < t - low).to(t.dtype)).clamp_(-self.levels, self.levels)


def alphabet_for(weights: torch.Tensor, bits: int, c: float = 1.0) -> Alphabet:
    """Eq (86): step C / (2^(b-1) N_out) * sum_j ||W_j||_inf over neurons (columns) j."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    if not c > 0:
        raise ValueError(f"C must be > 0, got {c}")
    mean_max = float(weights.abs().amax(dim=0).mean())
    step = c * mean_max / 2 ** (bits - 1)
    return Alphabet(step if step > 0 else 1.0, 2 ** (bits - 1) - 1)


def _column_norms2(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(dim=0)


def align_approximate(x: torch.Tensor, x_q: torch.Tensor, w: torch.Tensor,
                      order: int = 1) -> torch.Tensor:
    """Order-r data alignment, eqs (13) and (20), for all neurons (columns of w) at once.

    Pass 1 is eq (13); passes 2..r are eq (20): remove index t's previous contribution from
    the running error, then re-fit w~_t. Inputs whose column of x_q is zero get w~_t = 0 (eq 13
    divides by ||X~_t||^2; such inputs cannot affect X~ w~).
    """
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be a positive integer, got {order!r}")
    norms2 = _column_norms2(x_q)
    w_al = torch.zeros_like(w)
    err = torch.zeros(x.shape[0], w.shape[1], dtype=w.dtype, device=w.device)  # u^_t, m x N_out
    for sweep in range(order):
        for t in range(w.shape[0]):
            if norms2[t] == 0:
                if sweep == 0:
                    err += torch.outer(x[:, t], w[t])
                continue
            if sweep > 0:  # eq (20): v^_{t-1} = u^_{t-1} - w_t X_t + w~_t X~_t
                err += torch.outer(x_q[:, t], w_al[t]) - torch.outer(x[:, t], w[t])
            target = err + torch.outer(x[:, t], w[t])
            w_al[t] = x_q[:, t] @ target / norms2[t]
            err = target - torch.outer(x_q[:, t], w_al[t])
    return w_al


def align_perfect(x: torch.Tensor, x_q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Eq (18): per neuron, min ||w~||_inf subject to X~ w~ = X w, as a linear program.

    Variables (w~, s); minimize s subject to X~ w~ = X w and -s <= w~_i <= s. When the system
    has no solution (m >= N_in with rank-deficient X~, e.g. dead ReLUs), the neuron falls back
    to the least-squares solution, and the alignment error of that neuron is then not zero.
    """
    m, n_in = x_q.shape
    xq = x_q.detach().cpu().to(torch.float64).numpy()
    targets = (x @ w).detach().cpu().to(torch.float64).numpy()
    eye = np.eye(n_in)
    a_ub = np.block([[eye, -np.ones((n_in, 1))], [-eye, -np.ones((n_in, 1))]])
    a_eq = np.hstack([xq, np.zeros((m, 1))])
    cost = np.zeros(n_in + 1)
    cost[-1] = 1.0
    bounds = [(None, None)] * n_in + [(0, None)]
    out = np.empty((n_in, w.shape[1]))
    for j in range(w.shape[1]):
        res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * n_in), A_eq=a_eq, b_eq=targets[:, j],
                      bounds=bounds, method="highs")
        if res.status == 0:
            out[:, j] = res.x[:n_in]
        else:
            out[:, j] = np.linalg.lstsq(xq, targets[:, j], rcond=None)[0]
    return torch.from_numpy(out).to(device=w.device, dtype=w.dtype)


def quantize_path(x_q: torch.Tensor, w_al: torch.Tensor, alphabet: Alphabet,
                  u: torch.Tensor | None) -> torch.Tensor:
    """Phase II, eq (15): q_t = Q(w~_t + <X~_t, u~_{t-1}> / ||X~_t||^2), u~_t += (w~_t - q_t) X~_t.

    `u` (N_in x N_out uniforms) selects Q_StocQ; None selects the nearest point (Q_DetQ).
    Returns the integer levels k (q = k * step).
    """
    norms2 = _column_norms2(x_q)
    err = torch.zeros(x_q.shape[0], w_al.shape[1], dtype=w_al.dtype, device=w_al.device)
    k = torch.zeros_like(w_al)
    for t in range(w_al.shape[0]):
        z = w_al[t] + (x_q[:, t] @ err / norms2[t] if norms2[t] > 0 else 0.0)
        k[t] = alphabet.nearest(z) if u is None else alphabet.stochastic(z, u[t])
        err += torch.outer(x_q[:, t], w_al[t] - k[t] * alphabet.step)
    return k


def path_following(x: torch.Tensor, x_q: torch.Tensor, w: torch.Tensor, alphabet: Alphabet,
                   u: torch.Tensor | None) -> torch.Tensor:
    """Eq (11) (u given: SPFQ in its basic form) or eq (85) (u None: GPFQ), integer levels.

    q_t = Q(<X~_t, u_{t-1} + w_t X_t> / ||X~_t||^2), u_t = u_{t-1} + w_t X_t - q_t X~_t.
    """
    norms2 = _column_norms2(x_q)
    err = torch.zeros(x.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
    k = torch.zeros_like(w)
    for t in range(w.shape[0]):
        target = err + torch.outer(x[:, t], w[t])
        c = x_q[:, t] @ target / norms2[t] if norms2[t] > 0 else torch.zeros_like(w[t])
        k[t] = alphabet.nearest(c) if u is None else alphabet.stochastic(c, u[t])
        err = target - torch.outer(x_q[:, t], k[t] * alphabet.step)
    return k


def quantize_layer(x: torch.Tensor, x_q: torch.Tensor, w: torch.Tensor, alphabet: Alphabet,
                   method: str = "spfq", alignment: str = "approximate", order: int = 1,
                   seed: int = 0) -> torch.Tensor:
    """Integer levels k (N_in x N_out) of one layer's weights w, q = k * alphabet.step.

    x, x_q: the layer's inputs in the original and in the partly quantized network (m x N_in).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    if method == "msq":
        return alphabet.nearest(w)
    if method == "gpfq":
        return path_following(x, x_q, w, alphabet, None)
    u = uniforms64(seed, Purpose.PRIVATE, w.numel(), w.device).reshape(w.shape)
    if alignment == "perfect":
        w_al = align_perfect(x, x_q, w)
    else:
        w_al = align_approximate(x, x_q, w, order)
    return quantize_path(x_q, w_al, alphabet, u)


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


def _layers(model: nn.Module) -> list[nn.Module]:
    if not isinstance(model, nn.Sequential):
        raise ValueError("expected an nn.Sequential of nn.Linear layers and elementwise "
                         f"activations, got {type(model).__name__}")
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Sequential | nn.Conv1d | nn.Conv2d | nn.BatchNorm1d):
            raise ValueError(f"layer {i} ({type(layer).__name__}) is not supported: only "
                             "nn.Linear layers and elementwise activations")
    return list(model)


@torch.no_grad()
def quantize_model(model: nn.Module, calib_x: torch.Tensor, bits: int, method: str = "spfq",
                   c: float = 1.0, alignment: str = "approximate", order: int = 1,
                   seed: int = 0) -> tuple[nn.Sequential, int]:
    """Quantize every nn.Linear of an nn.Sequential MLP layer by layer (SPFQ, Algorithm 1).

    Args:
        model: nn.Sequential of nn.Linear and elementwise activations (left unchanged).
        calib_x: calibration batch X (m x N_0).
        bits: 2..8 bits per weight (alphabet of 2^bits - 1 levels, step from eq 86).
        method: "spfq", "gpfq" (eq 85) or "msq" (round to nearest).
        c: the constant C of eq (86).
        alignment, order: SPFQ's phase I, "approximate" of order r or "perfect" (eq 18).
        seed: seeds the stochastic quantizer (``fedquant.random``, ``Purpose.PRIVATE``).

    Returns:
        (the quantized copy of the model, its size in bytes: every layer's levels packed at
        `bits` bits plus one float64 step per layer).
    """
    layers = _layers(model)
    q_model = copy.deepcopy(model)
    x = x_q = calib_x.to(torch.float64)
    size = 0
    for i, (layer, q_layer) in enumerate(zip(layers, q_model, strict=True)):
        if isinstance(layer, nn.Linear):
            w = layer.weight.detach().to(torch.float64).T  # N_in x N_out, neurons as columns
            if layer.bias is not None:
                w = torch.cat([w, layer.bias.detach().to(torch.float64)[None]], dim=0)
            xa, xqa = (_with_ones(x), _with_ones(x_q)) if layer.bias is not None else (x, x_q)
            alphabet = alphabet_for(w, bits, c)
            k = quantize_layer(xa, xqa, w, alphabet, method, alignment, order,
                               seed=hash64(seed, Purpose.PRIVATE, i) >> 1)
            q = (k * alphabet.step).to(layer.weight.dtype)
            q_layer.weight.copy_(q[: layer.in_features].T)
            if layer.bias is not None:
                q_layer.bias.copy_(q[layer.in_features])
            size += len(pack((k + alphabet.levels).reshape(-1).to(torch.int64), alphabet.bits))
            size += 8  # the float64 step
            x = layer(x.to(layer.weight.dtype)).to(torch.float64)
            x_q = q_layer(x_q.to(layer.weight.dtype)).to(torch.float64)
        else:
            x, x_q = layer(x), q_layer(x_q)
    return q_model.eval(), size


@torch.no_grad()
def layer_output_errors(model: nn.Module, q_model: nn.Module, x: torch.Tensor) -> list[float]:
    """||X^(i) - X~^(i)||_F / ||X^(i)||_F after each nn.Linear (before its activation)."""
    errors = []
    a = b = x
    for layer, q_layer in zip(_layers(model), _layers(q_model), strict=True):
        a, b = layer(a), q_layer(b)
        if isinstance(layer, nn.Linear):
            errors.append(float(torch.linalg.norm(a - b) / torch.linalg.norm(a).clamp_min(1e-30)))
    return errors


def grid_search_c(model: nn.Module, calib_x: torch.Tensor, val_x: torch.Tensor,
                  val_y: torch.Tensor, bits: int, method: str = "spfq",
                  cs: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0),
                  **kwargs) -> tuple[float, dict[float, float]]:
    """SPFQ App. H's grid search for C: the C with the best top-1 accuracy on (val_x, val_y).

    Accuracy on a small validation set ties often; ties go to the C whose network output is
    closest to the original's (relative error of the last layer). Returns (best C,
    {C: accuracy}).
    """
    if not cs:
        raise ValueError("cs must list at least one value of C")
    scores, output_errors = {}, {}
    for c in cs:
        q_model, _ = quantize_model(model, calib_x, bits, method, c=c, **kwargs)
        with torch.no_grad():
            scores[c] = float((q_model(val_x).argmax(dim=1) == val_y).float().mean())
        output_errors[c] = layer_output_errors(model, q_model, val_x)[-1]
    best = max(scores, key=lambda c: (scores[c], -output_errors[c]))
    return best, scores


__all__ = ["ALIGNMENTS", "METHODS", "Alphabet", "align_approximate", "align_perfect",
           "alphabet_for", "grid_search_c", "layer_output_errors", "path_following",
           "quantize_layer", "quantize_model", "quantize_path"]
