"""Decoding and distributed mean estimation.

``decode_mean`` returns the weighted mean of the clients' reconstructions with O(d) extra
memory per worker whatever the number of clients. It is unbiased whenever the codec is.
Codecs with their own ``decode_sum`` (QUIC-FL clients sharing a rotation sum in the
rotated domain and invert it once) use it; every other codec decodes each client and adds
``w_i * x_hat_i`` into a float64 sum (:func:`accumulate`: one fused pass, no float64 copy
of any client), with the clients split between worker threads on the CPU (the numba
kernels release the GIL), each adding into its own partial sum. A codec with its own
``decode_mean(encs, weights, device)`` (the fp32 / fp16 / bf16 codecs: they divide each
block of the sum as they go) returns the float32 mean itself.

A payload that parsed but decodes to NaN or Inf (scales that overflow float32, say) is
refused with :class:`fedquant.WireError`, never returned.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from fedquant import buffers, cpu_kernels
from fedquant.codecs.base import Codec, all_finite, codec_for, restore
from fedquant.wire import Encoded, WireError

MAX_WORKERS = 32
PARALLEL_MIN = 1 << 22  # coordinates to decode in all before threads pay for themselves


def _check_finite(values: torch.Tensor, codec: str) -> None:
    if not all_finite(values):
        raise WireError(f"payload of codec '{codec}' decodes to non-finite values "
                        "(NaN or Inf)")


def decode(enc: Encoded, device: torch.device | str | None = None) -> torch.Tensor:
    """The reconstruction of one encoded tensor, with its original shape and dtype."""
    flat = codec_for(enc).decode(enc, device)
    _check_finite(flat, enc.codec)
    return restore(flat, enc)


def accumulate(total: torch.Tensor, values: torch.Tensor, weight: float = 1.0) -> None:
    """total += weight * values for a float64 `total` and float32 / float16 `values` of
    the same length, in one pass with no float64 copy of `values` (a numba loop on the
    CPU, torch's mixed-precision ``add_`` elsewhere)."""
    if total.dtype != torch.float64 or total.shape != values.shape:
        raise ValueError(f"accumulate: total must be float64 of shape {tuple(values.shape)}, "
                         f"got {total.dtype} {tuple(total.shape)}")
    if (cpu_kernels.usable(values) and total.device.type == "cpu"
            and total.is_contiguous()):
        cpu_kernels.axpy(total, values, float(weight))
    else:
        total.add_(values, alpha=float(weight))


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} updates")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError("weights must be finite and non-negative")
    total = sum(weights)  # math.fsum raises OverflowError instead of returning inf
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"the sum of the weights must be finite and positive, got {total}")
    return weights


def _partial_sum(codec: Codec, encs: Sequence[Encoded], weights: Sequence[float],
                 device: torch.device | str | None) -> torch.Tensor | None:
    """sum_i w_i decode(enc_i) in float64 over one worker's share of the clients."""
    total = None
    for enc, w in zip(encs, weights, strict=True):
        if w == 0:
            continue
        values = codec.decode(enc, device)
        if total is None:
            total = buffers.zeros(values.numel(), torch.float64, values.device)
        accumulate(total, values, w)
    return total


def split_sum(part: Callable[[list[Encoded], list[float]], torch.Tensor | None],
              encs: Sequence[Encoded], weights: Sequence[float],
              device: torch.device | str | None = None,
              workers: int | None = None) -> torch.Tensor | None:
    """sum over contiguous shares of the clients of part(share, share_weights), the shares
    run on `workers` threads on the CPU (default: one per core once there are
    PARALLEL_MIN coordinates in all; one on other devices), the partial sums added in a
    fixed order. `part` returns a float64 sum (or None for a share of zero weights)."""
    encs, weights = list(encs), list(weights)
    if workers is None:
        big = bool(encs) and len(encs) * encs[0].numel >= PARALLEL_MIN
        workers = min(os.cpu_count() or 1, MAX_WORKERS) if buffers.on_cpu(device) and big else 1
    workers = max(1, min(int(workers), len(encs)))
    if workers == 1:
        parts = [part(encs, weights)]
    else:
        bounds = [len(encs) * k // workers for k in range(workers + 1)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(part, encs[lo:hi], weights[lo:hi])
                       for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
            parts = [f.result() for f in futures]
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    total = parts[0]
    for p in parts[1:]:
        total.add_(p)
    return total


def decoded_sum(codec: Codec, encs: Sequence[Encoded], weights: Sequence[float],
                device: torch.device | str | None = None,
                workers: int | None = None) -> torch.Tensor:
    """sum_i w_i decode(enc_i) in float64 (flat) by per-client decodes, split over
    threads (:func:`split_sum`)."""
    total = split_sum(lambda e, w: _partial_sum(codec, e, w, device), encs, weights,
                      device, workers)
    if total is None:  # all weights zero
        return torch.zeros(encs[0].numel, dtype=torch.float64, device=device)
    return total


def weighted_sum(codec: Codec, encs: Sequence[Encoded], weights: Sequence[float],
                 device: torch.device | str | None = None,
                 workers: int | None = None) -> torch.Tensor:
    """sum_i w_i decode(enc_i) in float64 (flat): the codec's own ``decode_sum`` where it
    has one, else :func:`decoded_sum`."""
    if type(codec).decode_sum is not Codec.decode_sum:
        return codec.decode_sum(encs, weights, device).to(torch.float64)
    return decoded_sum(codec, encs, weights, device, workers)


def decode_mean(encs: Sequence[Encoded], weights: Sequence[float] | None = None,
                device: torch.device | str | None = None,
                workers: int | None = None) -> torch.Tensor:
    """Weighted mean sum_i w_i x_hat_i / sum_i w_i of encodings of one codec and shape.

    `workers`: threads decoding clients in parallel on the CPU (default one per core).
    ValueError for mismatched encodings or bad weights (negative, NaN, Inf, or a sum that
    is zero or overflows); WireError when the mean is not finite.
    """
    encs = list(encs)
    if not encs:
        raise ValueError("decode_mean needs at least one encoded update")
    first = encs[0]
    for i, enc in enumerate(encs[1:], start=1):
        if (enc.codec, enc.params, enc.shape) != (first.codec, first.params, first.shape):
            raise ValueError(
                f"encs[{i}] is {enc.codec}{enc.params} of shape {list(enc.shape)}, but encs[0] "
                f"is {first.codec}{first.params} of shape {list(first.shape)}: all must match")
    weights = _check_weights(weights, len(encs))
    codec = codec_for(first)
    if hasattr(codec, "decode_mean"):  # the identity codecs divide block by block as they sum
        mean = codec.decode_mean(encs, weights, device)
    else:
        total = weighted_sum(codec, encs, weights, device, workers).div_(sum(weights))
        mean = buffers.empty(total.numel(), torch.float32, total.device).copy_(total)
    _check_finite(mean, first.codec)
    return restore(mean, first)


__all__ = ["accumulate", "decode", "decode_mean", "decoded_sum", "split_sum", "weighted_sum"]
