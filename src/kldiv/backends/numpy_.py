"""NumPy fast path: cache-blocked, in-place, multi-threaded, bounded scratch memory.

The generic kernel makes about six passes over the data and allocates five full-size
temporaries. Here the rows are cut into blocks of about :data:`BLOCK_BYTES` per operand; a
block is clipped into two small per-thread scratch buffers, and ``t / p``, ``log`` and
``t * ...`` run in place there while the block is still in cache. The row sums go straight
into the output. NumPy releases the GIL inside ufunc loops, so the blocks are spread over a
small, reused thread pool.

For C-like layouts (see :func:`_c_like`: C order, row slices, reversed axes, broadcasting)
the result is **bitwise identical** to the generic kernel, at any size: every element goes
through the same ufuncs (clipping, division, ``log`` and multiplication are element-wise, so
the blocking does not change them), and every row is summed by ``np.add.reduce`` over a
contiguous buffer of the row's full length, which is NumPy's pairwise summation, exactly as
in the generic path. A row longer than the scratch budget is split along NumPy's own pairwise
tree (see :func:`_pairwise_split`), so the sum is still the same to the last bit, and the
extra memory stays bounded for every input size.

Other layouts (Fortran order, transposes, swapped axes, one C and one F input): NumPy lays
the formula's temporaries out in the inputs' order and sums their rows in another order (for
Fortran order: element after element, not pairwise). Up to :data:`AS_WRITTEN_MAX_BYTES` per full-size temporary they run the
formula as written (:func:`_as_written`), bitwise the generic kernel; above it, the blocked
kernel, in bounded memory, bitwise the generic kernel on C-ordered copies of the inputs (the
last bits of a row's sum may then differ from the generic kernel on the inputs as given).

The parallel machinery is built to survive what a library cannot control:

- **Caller runs.** A call cuts its rows into chunks that the calling thread and the pool's
  workers claim one at a time; the calling thread keeps claiming until none is left, then
  waits only for chunks a worker has already started. A call therefore never waits on a
  worker that does not exist or never wakes: the pool is an accelerator, not a dependency.
- **Fork.** ``os.register_at_fork`` drops the inherited pool, lock and thread-local scratch
  in the child, which makes its own pool on its next threaded call (``multiprocessing`` with
  the fork start method, torch ``DataLoader`` workers).
- **Interpreter shutdown.** When no worker thread can be started (in an ``atexit`` handler,
  during finalization) the call runs serially in the calling thread. The workers are daemon
  threads that only ever wait for work, so they never delay the exit.
- **Re-entry.** Scratch buffers are taken out of their per-thread slot while a frame uses
  them; a re-entrant call in the same thread (a signal handler, a ``__del__``) finds the slot
  empty and allocates its own, and never waits for a lock an outer frame holds.

Extra peak memory (the output excluded): ``2 * BLOCK_BYTES`` per thread working on the call
(three buffers and a boolean mask in the backward pass used by the PyTorch CPU path), i.e. at
most ``3.25 * 1 MiB * MAX_THREADS = 26 MiB``, whatever the input size (plus as much again for
each call that re-enters one of these threads, e.g. from a signal handler).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ._common import broadcast_floats

__all__ = ["BLOCK_BYTES", "MAX_THREADS", "MIN_PARALLEL", "backward", "forward", "kl_divergence"]

EPSILON = 1e-7
BLOCK_BYTES = 1024 * 1024
"""Bytes of one scratch buffer (two per worker): a block of rows fits in L2 cache."""
MAX_THREADS = 8
"""Upper bound on worker threads (the pool has ``min(usable CPUs, MAX_THREADS)``)."""
SMALL_ELEMENTS = 1 << 14
"""Inputs of at most this many elements skip the blocking (see :func:`_small`)."""
AS_WRITTEN_MAX_BYTES = 16 * 1024 * 1024
"""Fortran-ordered/transposed inputs whose full-size temporary (the broadcast shape) is at most
this many bytes go through :func:`_as_written`; larger ones through the memory-bounded blocked
kernel."""
MIN_PARALLEL = 1 << 17
"""Inputs with fewer elements than this run in the calling thread."""
CHUNKS_PER_THREAD = 4
"""Row ranges per worker thread (dynamic load balancing)."""
_PW_UNROLL = 8  # NumPy's pairwise summation splits at multiples of its unroll factor

_Work = Callable[[list[Any], list[Any], int, int], None]


class _Job:
    """One threaded call: ``chunks`` row ranges claimed one by one by whichever thread asks."""

    __slots__ = ("args", "bounds", "done", "error", "lock", "next", "pending")

    def __init__(self, work: _Work, full: list[Any], rows: list[Any], bounds: list[int]) -> None:
        self.args: tuple[_Work, list[Any], list[Any]] | None = (work, full, rows)
        self.bounds = bounds
        self.next = 0
        self.pending = len(bounds) - 1
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.done = threading.Event()

    def _claim(self) -> tuple[_Work, list[Any], list[Any], int, int] | None:
        with self.lock:
            i, args = self.next, self.args
            if args is None or i >= len(self.bounds) - 1:
                return None
            self.next = i + 1
        return (*args, self.bounds[i], self.bounds[i + 1])

    def _finish(self, error: BaseException | None) -> None:
        with self.lock:
            if error is not None and self.error is None:
                self.error = error
            self.pending -= 1
            if self.pending == 0:
                self.args = None  # the arrays are not kept alive by a job left in the queue
                self.done.set()

    def work_on(self) -> None:
        """Run chunks until none is left to claim (pool workers)."""
        while (claimed := self._claim()) is not None:
            work, full, rows, r0, r1 = claimed
            try:
                work(full, rows, r0, r1)
            except BaseException as exc:  # reported to the caller by ``run``
                self._finish(exc)
            else:
                self._finish(None)

    def run(self) -> None:
        """The calling thread: run chunks too, then wait for those the workers started."""
        try:
            while (claimed := self._claim()) is not None:
                work, full, rows, r0, r1 = claimed
                work(full, rows, r0, r1)
                self._finish(None)
        except BaseException:
            with self.lock:  # e.g. KeyboardInterrupt: stop handing out chunks
                self.next = len(self.bounds)
                self.args = None
            raise
        self.done.wait()
        if self.error is not None:
            raise self.error


class _Pool:
    """Daemon worker threads that take :class:`_Job` objects from a queue."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []

    def grow(self, n_workers: int) -> None:
        """Start workers up to ``n_workers``; raises ``RuntimeError`` when no thread can be
        started (interpreter shutdown), keeping those already started."""
        while len(self.threads) < n_workers:
            th = threading.Thread(target=self._worker, name=f"kldiv-numpy-{len(self.threads)}",
                                  daemon=True)
            th.start()
            self.threads.append(th)

    def _worker(self) -> None:
        while True:
            self.jobs.get().work_on()

    def submit(self, job: _Job, n: int) -> None:
        """Offer ``job`` to at most ``n`` workers."""
        for _ in range(min(n, len(self.threads))):
            self.jobs.put(job)


_pool: _Pool | None = None
_pool_lock = threading.Lock()
_local = threading.local()


def _after_fork_in_child() -> None:
    """A forked child inherits the pool object but none of its threads: start afresh."""
    global _pool, _pool_lock, _local
    _pool = None
    _pool_lock = threading.Lock()
    _local = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _n_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_THREADS))


def _get_pool(n_workers: int) -> _Pool | None:
    """The worker pool with (where it can) ``n_workers`` workers, or ``None``.

    Never blocks: when the pool is being made or grown by another thread, or by an outer
    frame of this one (a signal handler's call), the pool as it is (or none) is returned and
    the calling thread does the rest of the work itself. When no thread can be started
    (interpreter shutdown) the pool keeps the workers it has, possibly none.
    """
    global _pool
    pool = _pool
    if pool is not None and len(pool.threads) >= n_workers:
        return pool
    lock = _pool_lock
    if not lock.acquire(blocking=False):
        return pool
    try:
        if _pool is None:
            _pool = _Pool()
        # RuntimeError: "can't start new thread" / "... at interpreter shutdown"
        with contextlib.suppress(RuntimeError):
            _pool.grow(n_workers)
        return _pool
    finally:
        lock.release()


def _take_scratch(dtype: np.dtype[Any], n: int, k: int, mask: bool) -> list[np.ndarray]:
    """``k`` scratch buffers of ``n`` elements of ``dtype`` (and a boolean one if ``mask``).

    Taken out of this thread's slot (or freshly allocated if the slot is empty because an
    outer frame of this thread holds them, or holds others); give them back with
    :func:`_give_scratch`. Taking and giving back are single atomic steps, so a signal handler
    that interrupts a call never gets buffers that the interrupted frame is using.
    """
    key = (dtype.str, n, k, mask)
    slot: list[tuple[Any, list[np.ndarray]]] | None = getattr(_local, "slot", None)
    if slot is None:
        slot = _local.slot = []
    try:
        cached_key, bufs = slot.pop()
    except IndexError:
        pass
    else:
        if cached_key == key:
            return bufs
    bufs = [np.empty(n, dtype) for _ in range(k)]
    if mask:
        bufs.append(np.empty(n, dtype=bool))
    return bufs


def _give_scratch(dtype: np.dtype[Any], n: int, k: int, mask: bool,
                  bufs: list[np.ndarray]) -> None:
    """Put ``bufs`` back into this thread's slot (one set is kept, as a cache)."""
    slot = getattr(_local, "slot", None)
    if slot is not None and not slot:
        slot.append(((dtype.str, n, k, mask), bufs))


def _rows_view(x: np.ndarray, cols: int) -> np.ndarray | None:
    """``x`` as a 2-D ``(rows, cols)`` view without copying, or ``None`` if that needs a copy."""
    if x.ndim == 2:
        return x
    try:
        return np.reshape(x, (-1, cols), copy=False)  # NumPy >= 2.1
    except TypeError:  # pragma: no cover - older NumPy: no ``copy`` argument
        v = x.view()
        try:
            v.shape = (-1, cols)
        except AttributeError:
            return None
        return v
    except ValueError:
        return None


def _terms(t_src: np.ndarray, p_src: np.ndarray, tb: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """``t * log(t / p)`` of one block, computed in the scratch buffers; returns ``pb``."""
    np.clip(t_src, EPSILON, 1.0, out=tb)
    np.clip(p_src, EPSILON, 1.0, out=pb)
    np.divide(tb, pb, out=pb)
    np.log(pb, out=pb)
    np.multiply(tb, pb, out=pb)
    return pb


def _block_rows(t2: np.ndarray, p2: np.ndarray, out1: np.ndarray, r0: int, r1: int) -> None:
    """Rows ``r0:r1`` of 2-D ``t2``/``p2`` (rows fit in the scratch) into ``out1[r0:r1]``."""
    cols = t2.shape[1]
    elems = max(BLOCK_BYTES // t2.dtype.itemsize, cols)
    step = max(1, elems // cols)
    st, sp = bufs = _take_scratch(t2.dtype, step * cols, 2, False)
    for a in range(r0, r1, step):
        b = min(a + step, r1)
        n = (b - a) * cols
        tb = st[:n].reshape(b - a, cols)
        pb = sp[:n].reshape(b - a, cols)
        np.add.reduce(_terms(t2[a:b], p2[a:b], tb, pb), axis=-1, out=out1[a:b])
    _give_scratch(t2.dtype, step * cols, 2, False, bufs)


def _pairwise_split(t1: np.ndarray, p1: np.ndarray, lo: int, n: int, leaf: int) -> Any:
    """Sum of the terms of the 1-D slice ``lo:lo+n``, on NumPy's own pairwise tree.

    NumPy's pairwise sum of ``n > 128`` elements is ``sum(a[:n2]) + sum(a[n2:])`` with
    ``n2 = n // 2`` rounded down to a multiple of 8, recursively. Splitting at the same
    points, and summing each leaf of at most ``leaf`` elements with ``np.add.reduce``, gives
    the same result to the last bit while only a leaf is ever held in memory.
    """
    if n <= leaf:
        st, sp = bufs = _take_scratch(t1.dtype, leaf, 2, False)
        total = np.add.reduce(_terms(t1[lo:lo + n], p1[lo:lo + n], st[:n], sp[:n]))
        _give_scratch(t1.dtype, leaf, 2, False, bufs)
        return total
    n2 = n // 2
    n2 -= n2 % _PW_UNROLL
    return _pairwise_split(t1, p1, lo, n2, leaf) + _pairwise_split(t1, p1, lo + n2, n - n2, leaf)


def _long_rows(t2: np.ndarray, p2: np.ndarray, out1: np.ndarray, r0: int, r1: int) -> None:
    """Rows too long for the scratch budget: each row split along the pairwise tree."""
    leaf = max(BLOCK_BYTES // t2.dtype.itemsize, 256)
    cols = t2.shape[1]
    for r in range(r0, r1):
        out1[r] = _pairwise_split(t2[r], p2[r], 0, cols, leaf)


def _forward_rows(full: list[np.ndarray], rows: list[np.ndarray | None], r0: int, r1: int) -> None:
    t2, p2 = full
    out1 = rows[0]
    assert out1 is not None
    if t2.shape[1] * t2.dtype.itemsize > BLOCK_BYTES:
        _long_rows(t2, p2, out1, r0, r1)
    else:
        _block_rows(t2, p2, out1, r0, r1)


def _backward_rows(full: list[np.ndarray | None], rows: list[np.ndarray | None],
                   r0: int, r1: int) -> None:
    """Gradients of rows ``r0:r1``: ``-t/p * g`` and ``(log(t/p) + 1) * g``, 0 where clipped."""
    t2, p2, gt2, gp2 = full
    g1 = rows[0]
    assert t2 is not None and p2 is not None and g1 is not None
    cols = t2.shape[1]
    elems = max(BLOCK_BYTES // t2.dtype.itemsize, 256)
    step, chunk = (max(1, elems // cols), cols) if cols <= elems else (1, elems)
    bufs = _take_scratch(t2.dtype, step * chunk, 3, True)
    tb_, pb_, rb_, mb_ = bufs
    for a in range(r0, r1, step):
        b = min(a + step, r1)
        gcol = g1[a:b, None]
        for c0 in range(0, cols, chunk):
            c1 = min(c0 + chunk, cols)
            shape = (b - a, c1 - c0)
            n = shape[0] * shape[1]
            tb, pb, rb, mb = (x[:n].reshape(shape) for x in (tb_, pb_, rb_, mb_))
            t_src, p_src = t2[a:b, c0:c1], p2[a:b, c0:c1]
            np.clip(t_src, EPSILON, 1.0, out=tb)
            np.clip(p_src, EPSILON, 1.0, out=pb)
            np.divide(tb, pb, out=rb)
            if gp2 is not None:
                dst = gp2[a:b, c0:c1]
                np.multiply(rb, gcol, out=dst)
                np.negative(dst, out=dst)
                np.not_equal(pb, p_src, out=mb)  # clipped (or NaN): gradient 0
                np.copyto(dst, 0, where=mb)
            if gt2 is not None:
                dst = gt2[a:b, c0:c1]
                np.log(rb, out=rb)
                np.add(rb, 1, out=rb)
                np.multiply(rb, gcol, out=dst)
                np.not_equal(tb, t_src, out=mb)
                np.copyto(dst, 0, where=mb)
    _give_scratch(t2.dtype, step * chunk, 3, True, bufs)


def _run_2d(work: _Work, full: list[Any], rows: list[Any]) -> None:
    nrows, cols = full[0].shape
    threads = _n_threads() if nrows * cols >= MIN_PARALLEL else 1
    threads = min(threads, nrows)
    if threads <= 1:
        work(full, rows, 0, nrows)
        return
    # a few chunks per thread: a thread that the OS preempts (a busy machine) leaves its
    # remaining chunks to the others instead of holding up the whole call
    chunks = min(nrows, threads * CHUNKS_PER_THREAD)
    bounds = [nrows * i // chunks for i in range(chunks + 1)]
    job = _Job(work, full, rows, bounds)
    pool = _get_pool(threads - 1)  # the calling thread is the last of ``threads``
    if pool is not None:
        pool.submit(job, threads - 1)
    job.run()


def _run(work: _Work, full: list[Any], rows: list[Any]) -> None:
    """Apply ``work`` to ``full`` (arrays of one shape ``(..., C)``, or ``None``) and ``rows``
    (arrays of shape ``(...)``), as 2-D/1-D views; loops over the leading axis where the batch
    axes cannot be merged without a copy (e.g. ``(A, 1, C)`` broadcast against ``(A, B, C)``).
    """
    shape = next(x for x in full if x is not None).shape
    cols = shape[-1]
    full2 = [None if x is None else _rows_view(x, cols) for x in full]
    rows1 = [None if x is None else _rows_view(x[..., None], 1) for x in rows]
    if all((v is None) == (x is None) for v, x in zip(full2 + rows1, full + rows, strict=True)):
        _run_2d(work, full2, [None if v is None else v[:, 0] for v in rows1])
        return
    for i in range(shape[0]):
        _run(work, [None if x is None else x[i] for x in full],
             [None if x is None else x[i] for x in rows])


def _prepare(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray] | None:
    if not (type(y_true) is np.ndarray and type(y_pred) is np.ndarray):
        return None  # subclasses (masked arrays, np.matrix) keep their own ufunc semantics
    return broadcast_floats(np, y_true, y_pred)


def forward(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray | None:
    """The per-sample loss as an ndarray (0-d for 1-d inputs), or ``None`` to decline."""
    tp = _prepare(y_true, y_pred)
    if tp is None:
        return None
    t, p = tp
    out = np.empty(t.shape[:-1], dtype=t.dtype)
    _run(_forward_rows, [t, p], [out])
    return out


def backward(
    y_true: np.ndarray, y_pred: np.ndarray, grad: np.ndarray, need_true: bool, need_pred: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Gradients of ``sum(loss * grad)`` with respect to both inputs, of the broadcast shape.

    ``d/dp = -t / p * grad`` and ``d/dt = (log(t / p) + 1) * grad`` where the input is
    inside ``[eps, 1]``, 0 where it was clipped (or is NaN). The caller reduces a broadcast
    input's gradient to its own shape.
    """
    tp = _prepare(y_true, y_pred)
    if tp is None:
        raise ValueError("backward needs float32/float64 ndarrays of a non-empty shape")
    t, p = tp
    g = np.broadcast_to(np.asarray(grad, dtype=t.dtype), t.shape[:-1])
    gt = np.empty(t.shape, t.dtype) if need_true else None
    gp = np.empty(t.shape, t.dtype) if need_pred else None
    if gt is not None or gp is not None:
        _run(_backward_rows, [t, p, gt, gp], [g])
    return gt, gp


def _small(y_true: np.ndarray, y_pred: np.ndarray) -> Any:
    """Small inputs (per-call overhead matters more than memory): the formula in place.

    Two clipped copies and one C-ordered ratio buffer that the logarithm and the product
    overwrite; the same ufuncs and the same row sums as the generic kernel.
    """
    dtype = y_pred.dtype
    if dtype != y_true.dtype or dtype not in (np.float32, np.float64):
        return NotImplemented
    if y_true.size == 0 or y_pred.size == 0 or max(y_true.ndim, y_pred.ndim) == 0:
        return NotImplemented
    t = np.clip(y_true, EPSILON, 1.0)
    p = np.clip(y_pred, EPSILON, 1.0)
    q = np.divide(t, p, order="C")
    np.log(q, out=q)
    np.multiply(t, q, out=q)
    return np.add.reduce(q, axis=-1)


def _c_like(x: np.ndarray) -> bool:
    """True when NumPy's elementwise results for ``x`` are laid out in C order: the strides of
    its non-broadcast axes (extent > 1) do not grow from the first axis to the last. Then
    every row of ``t * log(t / p)`` is contiguous and NumPy sums it pairwise, as the blocked
    kernels do."""
    st = [abs(s) for s, n in zip(x.strides, x.shape, strict=True) if n > 1 and s != 0]
    return all(a >= b for a, b in itertools.pairwise(st))


def _temporaries_fit(y_true: np.ndarray, y_pred: np.ndarray) -> bool:
    """Whether one full-size temporary of the broadcast shape stays within
    :data:`AS_WRITTEN_MAX_BYTES`."""
    shape = np.broadcast_shapes(y_true.shape, y_pred.shape)
    return math.prod(shape) * max(y_true.itemsize, y_pred.itemsize) <= AS_WRITTEN_MAX_BYTES


def _as_written(y_true: np.ndarray, y_pred: np.ndarray) -> Any:
    """Other layouts (Fortran order, transposes): the formula exactly as Keras' docs write it.

    NumPy lays such temporaries out in the inputs' own order and sums their rows in another
    order than pairwise, so only the formula as written gives the documented float64 result
    bit for bit (SPEC §1). It makes the formula's full-size temporaries, so it is used only up
    to :data:`AS_WRITTEN_MAX_BYTES` per temporary; larger inputs of these layouts go through
    the memory-bounded blocked kernel (rows summed pairwise, as for a C-ordered copy).
    """
    dtype = y_pred.dtype
    if dtype != y_true.dtype or dtype not in (np.float32, np.float64):
        return NotImplemented
    if y_true.size == 0 or y_pred.size == 0 or max(y_true.ndim, y_pred.ndim) == 0:
        return NotImplemented
    t = np.clip(y_true, EPSILON, 1.0)
    p = np.clip(y_pred, EPSILON, 1.0)
    return np.sum(t * np.log(t / p), axis=-1)


def kl_divergence(y_true: Any, y_pred: Any) -> Any:
    """Blocked, threaded ``sum(t * log(t / p), axis=-1)`` on the clipped NumPy inputs.

    Parameters
    ----------
    y_true, y_pred : numpy.ndarray
        Same floating dtype (float32 or float64), broadcastable shapes, any strides. Never
        modified.

    Returns
    -------
    numpy.ndarray or NotImplemented
        The per-sample loss, or ``NotImplemented`` (the generic kernel then runs) for dtypes
        other than float32/float64 and empty inputs. Bitwise equal to the generic kernel's
        for C-like layouts at any size, and for other layouts (Fortran order, transposes)
        whose full-size temporary is at most :data:`AS_WRITTEN_MAX_BYTES`; for larger inputs
        of those layouts, bitwise equal to the generic kernel on C-ordered copies of the
        inputs, in bounded memory.
    """
    if type(y_true) is np.ndarray and type(y_pred) is np.ndarray:
        if not (_c_like(y_true) and _c_like(y_pred)) and _temporaries_fit(y_true, y_pred):
            return _as_written(y_true, y_pred)
        if max(y_true.size, y_pred.size) <= SMALL_ELEMENTS:
            return _small(y_true, y_pred)
    out = forward(y_true, y_pred)
    if out is None:
        return NotImplemented
    if out.ndim == 0:
        return out[()]
    return out
