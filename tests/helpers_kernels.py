"""The torch path of a codec, for tests that hold fedquant's numba kernels against it."""

from __future__ import annotations

import torch

import fedquant as fq
from fedquant import cpu_kernels


def torch_path(monkeypatch, codec: fq.Codec, x: torch.Tensor, seed: int,
               enc: fq.Encoded) -> tuple[fq.Encoded, torch.Tensor]:
    """(codec's encoding of x, the decode of `enc`) with the numba quantizers and
    receivers switched off (``cpu_kernels.usable`` / ``cpu_kernels.AVAILABLE``, which
    ``cpu_kernels.runs_on`` and ``vq_kernel.usable`` read); the RHT kernel stays on."""
    assert cpu_kernels.usable(x)  # so the caller's own encoding is the kernels'
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "usable", lambda *_: False)
        slow = codec.encode(x, seed=seed)
        m.setattr(cpu_kernels, "AVAILABLE", False)
        return slow, fq.decode(enc)
