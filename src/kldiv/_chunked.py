"""The loss or the metric over data that does not fit one call: batches, and ``.npy`` files.

:func:`evaluate_batches` streams two iterables of batches (any library, any device) through
one accumulator; :func:`evaluate_files` reads two ``.npy`` files window by window (each
window memory-mapped, then unmapped), so memory stays bounded by a few batches whatever the
file size. Both give what the loss class (or the metric) would give on the whole data, but
accumulated in float64 where the library has it (float32 with compensated summation
elsewhere). ``python -m kldiv compute`` is the command-line face of :func:`evaluate_files`.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

import numpy as np

from ._functional import compute, prepare
from ._namespace import _host_numpy, array_namespace
from ._reduction import Reduction, reduce_loss, validate_reduction
from .metrics import (
    BatchSums,
    KLDivergence,
    RunningSum,
    batch_sums,
    check_same_place,
    safe_divide,
)

__all__ = ["BACKENDS", "DataFileError", "evaluate_batches", "evaluate_files"]

PathLike = str | os.PathLike[str]

BACKENDS = ("numpy", "torch", "jax", "cupy", "dask", "array_api_strict")
"""Backends :func:`evaluate_files` can run on (``backend=`` names)."""

_INSTALL = {
    "torch": "pip install 'kldiv[torch]'",
    "jax": "pip install 'kldiv[jax]'",
    "cupy": "pip install 'kldiv[cupy]'",
    "dask": "pip install 'kldiv[dask]'",
    "array_api_strict": "pip install array-api-strict",
}

_BATCH_BYTES = 64 * 2**20  # default batch: about 64 MiB of the widest input


class DataFileError(ValueError):
    """A data file that cannot be used: missing, not ``.npy``, not numeric, 0-d, bad shape."""


# --------------------------------------------------------------------------------------
# Progress bars
# --------------------------------------------------------------------------------------


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _RichBar:
    def __init__(self, total: int | None, desc: str) -> None:
        from rich.console import Console
        from rich.progress import Progress

        console = Console(file=sys.stderr)
        # in a terminal the bar goes away when done; in a log, the final state stays
        self._progress = Progress(console=console, transient=console.is_terminal)
        self._progress.start()
        self._task = self._progress.add_task(desc, total=total)

    def update(self, n: int) -> None:
        self._progress.advance(self._task, n)

    def close(self) -> None:
        self._progress.stop()


def _progress_bar(progress: bool | str | None, total: int | None, desc: str) -> Any:
    """A bar with ``update(n)`` / ``close()``: tqdm, else rich; ``None`` means "if a terminal"."""
    if progress is None:
        progress = "auto" if sys.stderr.isatty() else False
    if progress is False:
        return _NoBar()
    kinds: tuple[str, ...] = ("tqdm", "rich") if progress in (True, "auto") else (str(progress),)
    for kind in kinds:
        if kind == "tqdm":
            try:
                from tqdm.auto import tqdm
            except ImportError:
                continue
            return tqdm(total=total, desc=desc, unit="row", unit_scale=True, file=sys.stderr,
                        leave=False, dynamic_ncols=True)
        if kind == "rich":
            try:
                return _RichBar(total, desc)
            except ImportError:
                continue
        else:
            raise ValueError(f"progress must be True, False, None, 'tqdm' or 'rich'; got {progress!r}.")
    if progress == "auto":
        return _NoBar()
    raise ImportError(
        f"progress={progress!r} needs {' or '.join(kinds)}: pip install 'kldiv[progress]' (tqdm)."
    )


def _rows_of(x: Any) -> int:
    shape = getattr(x, "shape", None)
    if shape is None:
        shape = np.shape(x)
    if len(shape) < 2 or shape[0] is None or shape[0] != shape[0]:
        return 1
    return int(shape[0])


def _wait(x: Any) -> None:
    """Block until ``x`` is computed, for libraries that dispatch asynchronously (JAX)."""
    ready = getattr(x, "block_until_ready", None)
    if ready is not None:
        ready()


# --------------------------------------------------------------------------------------
# .npy output, written sequentially
# --------------------------------------------------------------------------------------


class _NpyWriter:
    """Write a ``.npy`` file batch after batch (the leading axis grows), in bounded memory.

    A fixed-size header is reserved and filled in at :meth:`close`, when the shape is known.
    """

    _HEADER = 128

    def __init__(self, path: PathLike) -> None:
        self.path = os.fspath(path)
        self._f = open(self.path, "wb")  # noqa: SIM115  (closed in close())
        self._f.write(b"\x00" * self._HEADER)
        self._rows = 0
        self._rest: tuple[int, ...] | None = None
        self._dtype: np.dtype[Any] | None = None
        self._scalar = False

    def write(self, arr: np.ndarray) -> None:
        arr = np.asarray(arr)
        if arr.dtype.kind != "f" or arr.dtype.itemsize < 2:
            arr = arr.astype(np.float32)  # bfloat16 and friends: .npy has no such dtype
        if self._dtype is None:
            self._dtype, self._scalar = arr.dtype, arr.ndim == 0
            self._rest = tuple(arr.shape[1:])
        elif self._scalar or arr.ndim == 0 or tuple(arr.shape[1:]) != self._rest:
            raise ValueError("per-sample losses of the batches do not stack along the first axis.")
        arr = arr.astype(self._dtype, copy=False)
        self._f.write(np.ascontiguousarray(arr).tobytes())
        self._rows += 1 if arr.ndim == 0 else arr.shape[0]

    def close(self) -> None:
        dtype = self._dtype if self._dtype is not None else np.dtype(np.float32)
        shape = () if self._scalar else (self._rows, *(self._rest or ()))
        header = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                       "shape": shape})
        room = self._HEADER - 10 - 1
        if len(header) > room:
            raise ValueError(f"shape {shape} too large for the .npy header")
        self._f.seek(0)
        self._f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", self._HEADER - 10)
                      + header.ljust(room).encode("latin1") + b"\n")
        self._f.close()

    def abort(self) -> None:
        self._f.close()
        with contextlib.suppress(OSError):
            os.remove(self.path)


# --------------------------------------------------------------------------------------
# The accumulator behind both helpers
# --------------------------------------------------------------------------------------


class _Accumulator:
    """Running sum(w * loss), number of per-sample losses and sum(w), in one library/device."""

    def __init__(self) -> None:
        self.total: RunningSum | None = None
        self.n: RunningSum | None = None
        self.wsum: RunningSum | None = None
        self.out_dtype: Any = None
        self.weighted = False

    def add(self, sums: BatchSums) -> None:
        xp, total = sums.xp, sums.weighted_sum
        n = sums.n if hasattr(sums.n, "shape") else xp.zeros_like(total) + sums.n
        w = sums.weight_sum
        if self.total is None or self.n is None:
            compensated = total.dtype != xp.float64
            self.total, self.n = RunningSum(total, compensated), RunningSum(n, compensated)
            self.out_dtype = sums.out_dtype
        else:
            check_same_place(self.total.value, total, what="a batch", owner="evaluate_batches")
            self.total.add(total)
            self.n.add(n)
        if w is not None:
            self.weighted = True
            if self.wsum is None:
                self.wsum = RunningSum(w, total.dtype != xp.float64)
            else:
                self.wsum.add(w)

    def result(self, reduction: str) -> Any:
        if self.total is None or self.n is None:
            return np.asarray(0.0, dtype=np.float32)
        total = self.total.total()
        xp = array_namespace(total)
        if reduction == Reduction.SUM:
            out = total
        elif reduction == Reduction.MEAN_WITH_SAMPLE_WEIGHT and self.wsum is not None:
            out = safe_divide(xp, total, self.wsum.total())
        else:  # auto, sum_over_batch_size, mean: divide by the number of per-sample losses
            out = safe_divide(xp, total, self.n.total())
        return out if out.dtype == self.out_dtype else xp.astype(out, self.out_dtype)


def _zip_batches(
    y_true: Iterable[Any], y_pred: Iterable[Any], weights: Iterable[Any] | None
) -> Iterator[tuple[Any, Any, Any]]:
    missing = object()
    streams: list[Iterable[Any]] = [y_true, y_pred] + ([weights] if weights is not None else [])
    for i, items in enumerate(zip_longest(*streams, fillvalue=missing)):
        if any(item is missing for item in items):
            names = ["y_true", "y_pred", "sample_weight"]
            short = [names[k] for k, item in enumerate(items) if item is missing]
            raise ValueError(f"the batch iterables differ in length: {', '.join(short)} ended "
                             f"after {i} batches, the others did not.")
        yield items[0], items[1], (items[2] if weights is not None else None)


def _resolve_metric(metric: KLDivergence | bool | None, reduction: str | None) -> KLDivergence | None:
    if metric is None or metric is False:
        return None
    if reduction not in ("auto", Reduction.AUTO):
        raise ValueError("pass either metric= or reduction=, not both: the metric is a weighted mean.")
    if metric is True:
        return KLDivergence()
    if not isinstance(metric, KLDivergence):
        raise TypeError(f"metric must be True or a kldiv.metrics.KLDivergence, got {type(metric).__name__}.")
    return metric


def evaluate_batches(
    y_true_batches: Iterable[Any],
    y_pred_batches: Iterable[Any],
    sample_weight_batches: Iterable[Any] | None = None,
    *,
    reduction: str | None = "auto",
    metric: KLDivergence | bool | None = None,
    out: PathLike | None = None,
    progress: bool | str | None = False,
    total_rows: int | None = None,
    convert: Callable[[Any], Any] | None = None,
) -> Any:
    """The KL divergence loss (or metric) over a stream of batches.

    Gives what ``kldiv.KLDivergence(reduction)`` gives on the concatenation of the batches
    (along their first axis), or, with ``metric``, what a :class:`kldiv.metrics.KLDivergence`
    gives after one ``update_state`` per batch; only one batch is held at a time. Sums are
    kept in float64 where the library has it (float32 with compensated summation elsewhere),
    on the batches' device: nothing is read back to the host per batch.

    Parameters
    ----------
    y_true_batches, y_pred_batches : iterable of array_like
        Matching batches (any library; each computed in its ``y_pred``'s library and on its
        device, which must be the same for every batch). The iterables must have the same
        length.
    sample_weight_batches : iterable of array_like or float, optional
        One sample weight per batch (Keras 2 rules, as for the loss class).
    reduction : str or None, default "auto"
        ``"auto"`` / ``"sum_over_batch_size"`` / ``"mean"``: the weighted sum over all
        batches divided by the number of per-sample losses; ``"sum"``; ``"mean_with_sample_weight"``;
        ``"none"`` (or ``None``): the weighted per-sample losses, concatenated (in memory),
        or written to ``out``.
    metric : bool or kldiv.metrics.KLDivergence, optional
        ``True``: return the metric's result (the weighted mean) instead of a reduction. A
        metric instance is updated in place (it may already hold state) and its
        ``result()`` is returned.
    out : str or path, optional
        With ``reduction="none"``: write the per-sample losses to this ``.npy`` file, batch
        after batch, and return it memory-mapped (read-only).
    progress : bool, "tqdm", "rich" or None, default False
        Show a progress bar on stderr (``True``: tqdm, else rich; ``None``: only when stderr
        is a terminal).
    total_rows : int, optional
        The number of rows expected, for the progress bar.
    convert : callable, optional
        Applied to every array of every batch first (e.g. move NumPy batches to a device).

    Returns
    -------
    array
        A 0-d array of the batches' library and device (lazy for Dask), in ``y_pred``'s
        floating dtype (the metric's dtype with ``metric``); with ``reduction="none"``,
        the per-sample losses (or the ``.npy`` file as a read-only ``numpy.memmap``). With
        no batch at all, a NumPy 0-d array holding 0.

    Raises
    ------
    ValueError
        If the iterables differ in length, a batch has bad shapes, ``reduction`` is invalid,
        or both ``metric`` and a reduction are given.
    TypeError, ValueError
        If batches come from different libraries (``TypeError``) or devices (``ValueError``).

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv
    >>> rng = np.random.default_rng(0)
    >>> t = rng.dirichlet(np.ones(5), size=1000).astype(np.float32)
    >>> p = rng.dirichlet(np.ones(5), size=1000).astype(np.float32)
    >>> batches = lambda a: (a[i:i + 256] for i in range(0, len(a), 256))
    >>> streamed = kldiv.evaluate_batches(batches(t), batches(p))
    >>> whole = kldiv.KLDivergence()(t, p)
    >>> bool(np.isclose(streamed, whole, rtol=1e-6))
    True
    >>> m = kldiv.evaluate_batches(batches(t), batches(p), metric=True)
    >>> bool(np.isclose(m, whole, rtol=1e-6))
    True
    """
    the_metric = _resolve_metric(metric, reduction)
    red = validate_reduction(reduction) if the_metric is None else Reduction.AUTO
    if out is not None and red != Reduction.NONE:
        raise ValueError("out= is for reduction='none' (the per-sample losses).")
    acc = _Accumulator()
    parts: list[Any] = []
    writer = _NpyWriter(out) if out is not None else None
    bar = _progress_bar(progress, total_rows, "kldiv")
    pending: Any = None
    try:
        for yt, yp, sw in _zip_batches(y_true_batches, y_pred_batches, sample_weight_batches):
            if convert is not None:
                yt, yp = convert(yt), convert(yp)
                sw = convert(sw) if sw is not None and not isinstance(sw, (int, float)) else sw
            rows = _rows_of(yp) if _rows_of(yp) > 1 else _rows_of(yt)
            if the_metric is not None:
                the_metric.update_state(yt, yp, sw)
                done: Any = the_metric._total.value if the_metric._total is not None else None
            elif red == Reduction.NONE:
                prep = prepare(yt, yp)
                loss = reduce_loss(prep.xp, compute(prep), sw, reduction=Reduction.NONE)
                if parts:
                    check_same_place(parts[0], loss, what="a batch", owner="evaluate_batches")
                if writer is not None:
                    writer.write(_host_numpy(loss))
                    parts[:1] = [loss]
                else:
                    parts.append(loss)
                done = loss
            else:
                sums = batch_sums(yt, yp, sw)
                acc.add(sums)
                done = sums.weighted_sum
            # Bounded memory with asynchronous dispatch (JAX): stay one batch ahead, not more.
            if pending is not None:
                _wait(pending)
            pending = done
            bar.update(rows)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    if the_metric is not None:
        return the_metric.result()
    if red == Reduction.NONE:
        if writer is not None:
            writer.close()
            return np.load(writer.path, mmap_mode="r")
        if not parts:
            return np.zeros((0,), dtype=np.float32)
        if len(parts) == 1:
            return parts[0]
        xp = array_namespace(parts[0])
        if parts[0].ndim == 0:
            raise ValueError("reduction='none' over several batches needs inputs of at least 2-d.")
        return xp.concat(parts, axis=0)
    return acc.result(red)


# --------------------------------------------------------------------------------------
# .npy files
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """An input: an ``.npy`` file (read by row windows) or an in-memory array."""

    label: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    path: str | None = None  # None: in memory (``array``)
    offset: int = 0
    fortran: bool = False
    array: Any = None

    @property
    def name(self) -> str:
        return self.label if self.path is None else f"{self.label} file {self.path!r}"

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a NumPy array (a fresh mapping of just those rows)."""
        if self.path is None:
            return np.asarray(self.array[start:stop])
        if self.fortran or len(self.shape) < 1:
            full = np.load(self.path, mmap_mode="r")
            return np.array(full[start:stop])
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        n = stop - start
        if n == 0 or row_bytes == 0:
            return np.empty((n, *self.shape[1:]), dtype=self.dtype)
        window = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset + start * row_bytes,
                           shape=(n, *self.shape[1:]))
        return np.asarray(window)

    def whole(self) -> np.ndarray:
        if self.path is None:
            return np.asarray(self.array)
        return np.asarray(np.load(self.path, mmap_mode="r"))


def _open_source(x: Any, label: str) -> _Source:
    """Validate an input given as a ``.npy`` path or an array; never reads the data."""
    if not isinstance(x, (str, os.PathLike)):
        arr = np.asarray(x) if not hasattr(x, "shape") else x
        return _Source(label, tuple(arr.shape), np.dtype(arr.dtype), array=arr)
    path = os.fspath(x)
    name = f"{label} file {path!r}"
    if not os.path.exists(path):
        raise DataFileError(f"{name} does not exist.")
    if os.path.isdir(path):
        raise DataFileError(f"{name} is a directory, not a .npy file.")
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        msg = str(exc).splitlines()[0]
        if "pickle" in msg:
            msg = "not a .npy file (or one holding Python objects)"
        raise DataFileError(f"{name} cannot be read as a .npy array: {msg}") from None
    except (OSError, EOFError) as exc:
        raise DataFileError(f"{name} cannot be read as a .npy array: {exc}") from None
    if not isinstance(mm, np.ndarray):  # an .npz archive
        close = getattr(mm, "close", None)
        if close is not None:
            close()
        raise DataFileError(f"{name} is an .npz archive; save each array with numpy.save.")
    shape, dtype = tuple(mm.shape), mm.dtype
    offset = int(getattr(mm, "offset", 0))
    fortran = bool(mm.flags.f_contiguous and not mm.flags.c_contiguous)
    del mm
    _check_numeric(dtype, name)
    return _Source(label, shape, dtype, path=path, offset=offset, fortran=fortran)


def _check_numeric(dtype: np.dtype[Any], name: str) -> None:
    if dtype.kind == "c":
        raise DataFileError(f"{name} has complex dtype {dtype}; KL divergence needs real values.")
    if dtype.kind not in "biuf":
        raise DataFileError(f"{name} has dtype {dtype}, which is not numeric.")


@dataclass(frozen=True)
class _Layout:
    n_rows: int | None  # None: a single sample (1-d inputs), one batch
    sliced: tuple[bool, ...]  # per source: read by rows, or whole (it broadcasts)


def _layout(sources: list[_Source], weight: _Source | None) -> _Layout:
    t, p = sources
    for s in sources:
        if len(s.shape) == 0:
            raise DataFileError(f"{s.name} is 0-d; it needs at least one axis (the classes).")
    nd = max(len(t.shape), len(p.shape))
    if nd < 2:
        return _Layout(None, (False, False, False))
    big = [s for s in sources if len(s.shape) == nd]
    squeeze = any(s.shape[-1] == 1 for s in big)  # Keras 2: rank + 1 with a trailing 1

    def row_source(s: _Source) -> bool:
        return len(s.shape) == nd or (squeeze and len(s.shape) == nd - 1 and len(s.shape) >= 2)

    counts = {s.shape[0] for s in sources if row_source(s)}
    long = counts - {1}
    if len(long) > 1:
        desc = " and ".join(f"{s.name} of shape {s.shape}" for s in sources)
        raise DataFileError(f"{desc} do not have the same number of rows.")
    n = long.pop() if long else 1
    sliced = [row_source(s) and s.shape[0] == n for s in sources]
    w_sliced = weight is not None and len(weight.shape) >= 1 and weight.shape[0] == n and n > 1
    return _Layout(n, (sliced[0], sliced[1], w_sliced))


def _check_shapes(sources: list[_Source], weight: _Source | None, layout: _Layout) -> None:
    """Run the checks of the loss on zero-cost stand-ins of one row (shapes only)."""
    def standin(s: _Source, sliced: bool) -> np.ndarray:
        shape = (min(s.shape[0], 1), *s.shape[1:]) if sliced else s.shape
        return np.broadcast_to(np.zeros((), dtype=np.float32), shape)

    t, p = (standin(s, sl) for s, sl in zip(sources, layout.sliced, strict=False))
    try:
        prep = prepare(t, p)
        loss = compute(prep)
        if weight is not None:
            reduce_loss(prep.xp, loss, standin(weight, layout.sliced[2]), reduction=Reduction.NONE)
    except (ValueError, TypeError) as exc:
        desc = ", ".join(f"{s.label} {s.shape}" for s in [*sources, *([weight] if weight else [])])
        raise DataFileError(f"shapes do not fit ({desc}): {exc}") from None


def _converter(backend: str, device: str | None) -> Callable[[np.ndarray], Any]:
    """A function moving a NumPy batch to ``backend`` on ``device``."""
    backend = backend.lower().replace("-", "_")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}.")
    if backend in ("numpy", "dask"):
        if device not in (None, "cpu"):
            raise ValueError(f"backend {backend!r} runs on the CPU; got device {device!r} "
                             "(use backend='cupy' for a GPU).")
        return np.asarray
    try:
        if backend == "torch":
            import torch

            tdev = torch.device(device or "cpu")
            if tdev.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("torch sees no CUDA device here")

            def to_torch(a: np.ndarray) -> Any:
                return torch.from_numpy(np.array(a)).to(tdev)

            return to_torch
        if backend == "jax":
            import jax

            jdev: Any = None
            if device is not None:
                platform, _, index = device.partition(":")
                platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
                try:
                    jdev = jax.devices(platform)[int(index or 0)]
                except (RuntimeError, IndexError, ValueError) as exc:
                    raise RuntimeError(f"JAX has no device {device!r}: {exc}") from None

            def to_jax(a: np.ndarray) -> Any:
                return jax.device_put(np.asarray(a), jdev)

            return to_jax
        if backend == "cupy":
            import cupy as cp

            gpu = int((device or "cuda:0").partition(":")[2] or 0)

            def to_cupy(a: np.ndarray) -> Any:
                with cp.cuda.Device(gpu):
                    return cp.asarray(a)

            return to_cupy
        import array_api_strict as xps

        sdev = xps.Device(device) if device is not None else None

        def to_strict(a: np.ndarray) -> Any:
            return xps.asarray(np.array(a), device=sdev)

        return to_strict
    except ImportError as exc:
        raise ImportError(f"backend {backend!r} is not installed ({exc}): {_INSTALL[backend]}") from None


def _read_block(path: str, offset: int, dtype: str, shape: tuple[int, ...], fortran: bool,
                block_info: Any = None) -> np.ndarray:
    """Dask task: read one block of rows of an ``.npy`` file (on whichever worker runs it)."""
    start, stop = block_info[None]["array-location"][0]
    src = _Source("", shape, np.dtype(dtype), path=path, offset=offset, fortran=fortran)
    return src.rows(start, stop)


def _dask_array(src: _Source, batch_rows: int) -> Any:
    """A lazy Dask array reading ``src`` by blocks of rows: only the path travels to workers."""
    import dask.array as da
    from dask.base import tokenize

    if src.path is None:
        return da.from_array(src.array, chunks=(batch_rows, *src.shape[1:]))
    n = src.shape[0]
    row_chunks = tuple(min(batch_rows, n - i) for i in range(0, n, batch_rows)) or (0,)
    chunks = (row_chunks, *((d,) for d in src.shape[1:]))
    return da.map_blocks(
        _read_block, src.path, src.offset, src.dtype.str, src.shape, src.fortran,
        dtype=src.dtype, chunks=chunks, meta=np.empty((0,) * len(src.shape), dtype=src.dtype),
        name="kldiv-read-" + tokenize(src.path, os.stat(src.path).st_mtime_ns, src.offset, src.dtype.str,
                                      src.shape, chunks),
    )


def evaluate_files(
    y_true: PathLike | Any,
    y_pred: PathLike | Any,
    *,
    sample_weight: PathLike | Any = None,
    reduction: str | None = "auto",
    metric: KLDivergence | bool | None = None,
    backend: str = "numpy",
    device: str | None = None,
    batch_rows: int | None = None,
    out: PathLike | None = None,
    progress: bool | str | None = False,
) -> Any:
    """The KL divergence loss (or metric) over two ``.npy`` files, batch by batch.

    Reads ``batch_rows`` rows of each file at a time, each window memory-mapped and
    unmapped after use, moves them to ``backend`` on ``device`` and accumulates there (see
    :func:`evaluate_batches`): memory stays bounded by a few batches, whatever the files'
    size. The result is what ``kldiv.KLDivergence(reduction)`` (or the metric) gives on the
    whole arrays.

    Parameters
    ----------
    y_true, y_pred : str, path or array
        ``.npy`` files of real numeric dtype (or arrays: NumPy, ``numpy.memmap``, ...), of at
        least one axis; batches are rows of the first axis. An input with a single row, or
        with fewer axes, broadcasts and is read whole.
    sample_weight : str, path, array or float, optional
        Per-sample weights (Keras 2 rules), a ``.npy`` path or an array; read by rows too
        when it has one weight per row.
    reduction : str or None, default "auto"
        As for :class:`kldiv.KLDivergence`. ``"none"`` returns the per-sample losses; give
        ``out`` to write them to a ``.npy`` file in bounded memory instead.
    metric : bool or kldiv.metrics.KLDivergence, optional
        Return the metric's result (the weighted mean) instead; an instance is updated in
        place.
    backend : str, default "numpy"
        One of ``"numpy"``, ``"torch"``, ``"jax"``, ``"cupy"``, ``"dask"``,
        ``"array_api_strict"``. With ``"dask"`` the files become lazy Dask arrays (only
        the paths travel to the workers, which must see the same files) and the result is
        returned lazy: call ``.compute()`` (on a ``dask.distributed`` client if you like).
    device : str, optional
        The device, in the backend's words: ``"cuda"``, ``"cuda:1"`` (torch, CuPy),
        ``"gpu"`` / ``"cpu"`` (JAX), ... Default: the backend's default device.
    batch_rows : int, optional
        Rows per batch (per Dask chunk). Default: about 64 MiB of the widest input.
    out : str or path, optional
        With ``reduction="none"``: the ``.npy`` file to write the per-sample losses to.
    progress : bool, "tqdm", "rich" or None, default False
        A progress bar on stderr (in rows); ``None``: when stderr is a terminal. Not used
        with ``backend="dask"`` (use Dask's own progress bar or dashboard).

    Returns
    -------
    array
        As :func:`evaluate_batches`: a 0-d array of the backend on the device, in the
        floating dtype of ``y_pred`` (float32 for integer data), or the metric's dtype.

    Raises
    ------
    DataFileError
        (a ``ValueError``) If a file is missing, not a ``.npy`` array, not real numeric,
        0-d, or the shapes do not fit.
    ImportError
        If ``backend`` is not installed.
    RuntimeError
        If ``device`` is not available.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import kldiv
    >>> d = tempfile.mkdtemp()
    >>> np.save(os.path.join(d, "t.npy"), np.array([[0, 1], [0, 0]], dtype=np.float32))
    >>> np.save(os.path.join(d, "p.npy"), np.array([[.6, .4], [.4, .6]], dtype=np.float32))
    >>> print(kldiv.evaluate_files(os.path.join(d, "t.npy"), os.path.join(d, "p.npy"), batch_rows=1))
    0.45814306
    >>> print(kldiv.evaluate_files(os.path.join(d, "t.npy"), os.path.join(d, "p.npy"),
    ...                            sample_weight=[1, 0], metric=True, batch_rows=1))
    0.9162892
    """
    the_metric = _resolve_metric(metric, reduction)
    red = validate_reduction(reduction) if the_metric is None else Reduction.AUTO
    if out is not None and red != Reduction.NONE:
        raise ValueError("out= is for reduction='none' (the per-sample losses).")
    if batch_rows is not None and (not isinstance(batch_rows, int) or batch_rows < 1):
        raise ValueError(f"batch_rows must be a positive integer, got {batch_rows!r}.")
    sources = [_open_source(y_true, "y_true"), _open_source(y_pred, "y_pred")]
    weight = None
    if sample_weight is not None and not isinstance(sample_weight, (int, float)):
        weight = _open_source(sample_weight, "sample_weight")
    layout = _layout(sources, weight)
    _check_shapes(sources, weight, layout)
    convert = _converter(backend, device)
    convert(np.zeros((1,), dtype=np.float32))  # fail now if the device is not there
    n = layout.n_rows
    if batch_rows is None:
        widest = max(int(np.prod(s.shape[1:], dtype=np.int64)) * s.dtype.itemsize for s in sources)
        batch_rows = max(1, _BATCH_BYTES // max(widest, 1))
    all_sources = [*sources, weight]

    if backend.lower() == "dask":
        def lazy(s: _Source | None, sliced: bool) -> Any:
            if s is None:
                return sample_weight
            if sliced:
                return _dask_array(s, batch_rows)
            return s.whole()

        yt, yp, sw = (lazy(s, sl) for s, sl in zip(all_sources, layout.sliced, strict=True))
        if the_metric is not None:
            the_metric.update_state(yt, yp, sw)
            return the_metric.result()
        if red == Reduction.NONE and out is not None:
            xp, loss = _prep_loss(yt, yp)
            return _store_blocks(reduce_loss(xp, loss, sw, reduction=Reduction.NONE), out)
        from .losses import KLDivergence as Loss

        return Loss(reduction=red)(yt, yp, sample_weight=sw)

    def stream(i: int) -> Iterator[Any]:
        s, sliced = all_sources[i], layout.sliced[i]
        if s is None:
            yield from _repeat(sample_weight, n, batch_rows)
            return
        if n is None or not sliced:
            whole = s.whole()
            yield from _repeat(whole, n, batch_rows)
            return
        for start in range(0, max(n, 1), batch_rows):
            yield s.rows(start, min(start + batch_rows, n))

    weights = stream(2) if sample_weight is not None else None
    return evaluate_batches(
        stream(0), stream(1), weights, reduction=red if the_metric is None else "auto",
        metric=the_metric, out=out, progress=progress, total_rows=n,
        convert=convert,
    )


def _repeat(x: Any, n: int | None, batch_rows: int) -> Iterator[Any]:
    count = 1 if n is None else len(range(0, max(n, 1), batch_rows))
    for _ in range(count):
        yield x


def _prep_loss(y_true: Any, y_pred: Any) -> tuple[Any, Any]:
    prep = prepare(y_true, y_pred)
    return prep.xp, compute(prep)


def _store_blocks(loss: Any, out: PathLike) -> np.ndarray:
    """Compute a lazy Dask per-sample loss block by block into a ``.npy`` file."""
    writer = _NpyWriter(out)
    try:
        for block in loss.to_delayed().ravel():
            writer.write(np.asarray(block.compute()))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return np.load(os.fspath(out), mmap_mode="r")

