"""Fresh 1-D tensors for the codecs' large buffers, on transparent huge pages on the CPU.

torch allocates CPU tensors with plain ``malloc``: past glibc's mmap threshold (at most
32 MiB, lower until the process has freed a large block) a fresh buffer is new memory,
and its first write takes one page fault per 4 KiB. numpy asks the kernel for
transparent huge pages (``madvise``) for arrays of 4 MiB or more: one fault per 2 MiB.
On the 2-core development VM a 4 KiB fault costs about 1.6 us, ten times the cost of
writing the page: a fresh 32 MiB buffer took 7.9 ms to fill from torch, 2.3 ms from
numpy (docs/kernels.md, "Fresh memory").

:func:`empty` and :func:`zeros` allocate through numpy on the CPU (bfloat16 as int16
words, viewed) and through torch on every other device. The advice applies to the one
allocation: no process-wide setting changes.
"""

from __future__ import annotations

import numpy as np
import torch

_NUMPY = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
          torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16,
          torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_}


def on_cpu(device: torch.device | str | None) -> bool:
    """Whether `device` is the CPU (None means the CPU, as torch's own default)."""
    return device is None or torch.device(device).type == "cpu"


def empty(n: int, dtype: torch.dtype = torch.float32,
          device: torch.device | str | None = None) -> torch.Tensor:
    """An uninitialized 1-D tensor of n elements (numpy-allocated on the CPU)."""
    if not on_cpu(device):
        return torch.empty(n, dtype=dtype, device=device)
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.empty(n, dtype=np.int16)).view(torch.bfloat16)
    if dtype not in _NUMPY:
        return torch.empty(n, dtype=dtype)
    return torch.from_numpy(np.empty(n, dtype=_NUMPY[dtype]))


def zeros(n: int, dtype: torch.dtype = torch.float32,
          device: torch.device | str | None = None) -> torch.Tensor:
    """A 1-D tensor of n zeros (numpy-allocated on the CPU)."""
    if not on_cpu(device) or dtype not in _NUMPY:
        return torch.zeros(n, dtype=dtype, device=device)
    return torch.from_numpy(np.zeros(n, dtype=_NUMPY[dtype]))


def empty_like(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """:func:`empty` with x's dtype and device (n elements, default x's count)."""
    return empty(x.numel() if n is None else n, x.dtype, x.device)


__all__ = ["empty", "empty_like", "on_cpu", "zeros"]
