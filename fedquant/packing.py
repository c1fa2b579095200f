"""b-bit packing of unsigned integers (b = 1..8) into bytes, little-endian, LSB first.

Every group of 8 values becomes exactly b bytes, so packing is one vectorized pass on any
device: the 8 values are OR-ed into one 64-bit word and its low b bytes are emitted. The
packed length of n values is ceil(n * b / 8) bytes: the final group's unused high bytes
(they hold only zero padding) are dropped.
"""

from __future__ import annotations

import numpy as np
import torch


def packed_len(count: int, bits: int) -> int:
    """Bytes needed for `count` values of `bits` bits."""
    return (count * bits + 7) // 8


def pack(values: torch.Tensor, bits: int) -> bytes:
    """Pack a 1-D integer tensor with entries in [0, 2^bits) into bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n = values.numel()
    v = values.reshape(-1)
    if bits == 8:
        return v.to(torch.uint8).cpu().numpy().tobytes()
    groups = -(-n // 8)
    if 8 % bits == 0:  # whole values per byte: stay in uint8
        per = 8 // bits
        padded = torch.zeros(-(-n // per) * per, dtype=torch.uint8, device=v.device)
        padded[:n] = v.to(torch.uint8)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=v.device)
        packed = (padded.view(-1, per) << shifts).sum(dim=1, dtype=torch.uint8)
        return packed.cpu().numpy().tobytes()
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=v.device)
    padded[:n] = v.to(torch.int64)
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=v.device)
    words = (padded.view(groups, 8) << shifts).sum(dim=1)
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=v.device)
    out = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_len(n, bits)].cpu().numpy().tobytes()


def unpack(
    data: bytes, bits: int, count: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Inverse of :func:`pack`: `count` values (int64) on `device`."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if len(data) != packed_len(count, bits):
        raise ValueError(
            f"packed data has {len(data)} bytes, expected {packed_len(count, bits)} "
            f"for {count} values of {bits} bits"
        )
    raw = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()).to(device)
    if bits == 8:
        return raw.to(torch.int64)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=raw.device)
        vals = (raw.unsqueeze(1) >> shifts) & mask
        return vals.reshape(-1)[:count].to(torch.int64)
    groups = -(-count // 8)
    padded = torch.zeros(groups * bits, dtype=torch.int64, device=raw.device)
    padded[: raw.numel()] = raw.to(torch.int64)
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=raw.device)
    words = (padded.view(groups, bits) << byte_shifts).sum(dim=1)
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=raw.device)
    vals = (words.unsqueeze(1) >> shifts) & mask
    return vals.reshape(-1)[:count]
