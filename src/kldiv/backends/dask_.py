"""Dask's adapter: its file target (NumPy batches, computed lazily), its lazy ``.npy`` file
inputs (:func:`file_input`, read by blocks on the workers) and ``kldiv show`` row.

Dask has no fast path: the generic kernel builds the task graph.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from .._npyio import Source, host_ready, to_host
from .._targets import Target
from .numpy_adapter import cpu_target

__all__ = ["file_input", "show_devices", "target"]


def target(device: str | None) -> Target:
    """Dask's file target: NumPy batches on the CPU (a dask.distributed client sends them on)."""
    return cpu_target("dask", device)


def show_devices() -> Iterator[tuple[str, Callable[[Any], Any] | None, str]]:
    """``kldiv show``'s row: a lazy Dask array of NumPy chunks."""
    yield "cpu (lazy)", lambda v: da.from_array(np.asarray(v, dtype=np.float32)), ""


def _read_block(path: str, offset: int, dtype: str, shape: tuple[int, ...], fortran: bool,
                block_info: Any = None) -> np.ndarray:
    """Dask task: read one block of rows of an ``.npy`` file (on whichever worker runs it)."""
    start, stop = block_info[None]["array-location"][0]
    dt = np.dtype(dtype)
    src = Source("", shape, dt, "float", dt.itemsize, path=path, offset=offset, fortran=fortran)
    return host_ready(src.rows(start, stop))


def file_input(src: Source, sliced: bool, batch_rows: int) -> da.Array:
    """A lazy Dask array of ``src``: read by blocks of ``batch_rows`` rows (only the path
    travels to the workers) where ``sliced``, else whole (it broadcasts); in the machine's
    byte order."""
    if src.path is None:
        x = src.array
        if not isinstance(x, da.Array):
            x = da.from_array(host_ready(to_host(x)), chunks=(batch_rows, *src.shape[1:]) if sliced else -1)
        elif not np.dtype(x.dtype).isnative:
            x = x.astype(np.dtype(x.dtype).newbyteorder("="))
        return x
    if not sliced:
        return da.from_array(host_ready(src.whole()), chunks=-1)
    n = src.shape[0]
    native = src.dtype.newbyteorder("=")
    row_chunks = tuple(min(batch_rows, n - i) for i in range(0, n, batch_rows)) or (0,)
    chunks = (row_chunks, *((d,) for d in src.shape[1:]))
    return da.map_blocks(
        _read_block, src.path, src.offset, src.dtype.str, src.shape, src.fortran,
        dtype=native, chunks=chunks, meta=np.empty((0,) * len(src.shape), dtype=native),
        name="kldiv-read-" + tokenize(src.path, os.stat(src.path).st_mtime_ns, src.offset, src.dtype.str,
                                      src.shape, chunks),
    )
