"""Dask's adapter: its file target (NumPy batches, computed lazily) and ``kldiv show`` row.

Dask has no fast path: the generic kernel builds the task graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .._targets import Target
from .numpy_adapter import cpu_target

__all__ = ["show_devices", "target"]


def target(device: str | None) -> Target:
    """Dask's file target: NumPy batches on the CPU (a dask.distributed client sends them on)."""
    return cpu_target("dask", device)


def show_devices() -> Iterator[tuple[str, Callable[[Any], Any] | None, str]]:
    """``kldiv show``'s row: a lazy Dask array of NumPy chunks."""
    import dask.array as da

    yield "cpu (lazy)", lambda v: da.from_array(np.asarray(v, dtype=np.float32)), ""
