"""Named model arrays (a ``state_dict``, a Flower ``ArrayRecord``) as one flat vector.

A model update is compressed as ONE ``fq.Encoded`` over all its floating-point arrays
concatenated: one rotation and one header, so small layers (biases, norms) cost nothing
extra. Integer and bool arrays (e.g. BatchNorm's ``num_batches_tracked``) and the keys that
match a *raw* pattern (by default BatchNorm's running statistics, whose variance must stay
positive) travel uncompressed.

Example::

    compressed, raw = split_keys(arrays)            # arrays: dict[str, np.ndarray]
    flat = flatten_arrays(arrays, compressed)       # float32 torch vector
    arrays2 = unflatten_arrays(flat, arrays, compressed)  # same keys, shapes and dtypes
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import numpy as np
import torch

#: keys that travel uncompressed by default: BatchNorm's running statistics and its batch
#: counter (an int buffer that FedAvg averages into a float: compressed with the weights, its
#: large delta would set the quantization scale of the whole update)
DEFAULT_RAW_PATTERNS: tuple[str, ...] = ("*running_mean", "*running_var",
                                         "*num_batches_tracked")


def is_raw_key(key: str, patterns: Sequence[str] = DEFAULT_RAW_PATTERNS) -> bool:
    """Whether `key` matches one of the glob `patterns` (``fnmatch``)."""
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def split_keys(arrays: Mapping[str, np.ndarray],
               raw_patterns: Sequence[str] = DEFAULT_RAW_PATTERNS,
               ) -> tuple[list[str], list[str]]:
    """(keys to compress, keys sent raw), each in the order of `arrays`.

    Floating-point arrays are compressed unless their key matches `raw_patterns`; every
    other dtype (int, bool) is sent raw.
    """
    compressed, raw = [], []
    for key, value in arrays.items():
        floating = np.issubdtype(np.asarray(value).dtype, np.floating)
        (compressed if floating and not is_raw_key(key, raw_patterns) else raw).append(key)
    return compressed, raw


def flatten_arrays(arrays: Mapping[str, np.ndarray], keys: Sequence[str]) -> torch.Tensor:
    """The arrays `keys` concatenated into one flat float32 tensor (a copy)."""
    if not keys:
        return torch.zeros(0, dtype=torch.float32)
    parts = [np.asarray(arrays[k], dtype=np.float32).reshape(-1) for k in keys]
    return torch.from_numpy(np.concatenate(parts))


def unflatten_arrays(flat: torch.Tensor, like: Mapping[str, np.ndarray],
                     keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Split `flat` back into the arrays `keys` with the shapes and dtypes of `like`."""
    values = flat.detach().to("cpu", torch.float32).numpy()
    expected = sum(int(np.asarray(like[k]).size) for k in keys)
    if values.size != expected:
        raise ValueError(f"flat vector has {values.size} elements, the arrays {list(keys)} "
                         f"need {expected}")
    out, offset = {}, 0
    for k in keys:
        ref = np.asarray(like[k])
        out[k] = values[offset: offset + ref.size].reshape(ref.shape).astype(ref.dtype)
        offset += ref.size
    return out
