"""The one numba import shim: ``njit``/``prange`` that fall back to plain Python.

numba is a pinned dependency, so the fallback only matters on a platform without a numba
wheel: then ``AVAILABLE`` is False, ``njit`` returns the function unchanged (so modules
still import and their pure-Python / torch paths run) and ``prange`` is ``range``.
Every numba kernel in fedquant imports these names from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import numba as nb
except ImportError:  # pragma: no cover - numba is a pinned dependency
    nb = None

AVAILABLE = nb is not None


def _identity(f: Callable | None = None, **_options: Any) -> Any:
    """``@njit`` and ``@njit(...)`` without numba: the function itself."""
    return f if f is not None else (lambda g: g)


njit = nb.njit if AVAILABLE else _identity
prange = nb.prange if AVAILABLE else range

__all__ = ["AVAILABLE", "nb", "njit", "prange"]
